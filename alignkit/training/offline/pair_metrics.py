"""The `rewards/*` and `logps/*` metrics of pairwise tasks (reward models, preference losses)."""

from __future__ import annotations

from torch import Tensor

from alignkit.objectives import PairLogps

Metrics = dict[str, Tensor]


def score_pair_metrics(loss: Tensor, chosen: Tensor, rejected: Tensor) -> Metrics:
    """Loss and the `rewards/*` metrics of chosen vs rejected scores (B,), detached."""
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen.mean().detach(),
        "rewards/rejected": rejected.mean().detach(),
        "rewards/margins": (chosen - rejected).mean().detach(),
        "rewards/accuracies": (chosen > rejected).float().mean().detach(),
    }


def implicit_reward_metrics(loss: Tensor, logps: PairLogps, beta: float) -> Metrics:
    """`rewards/*` from DPO's implicit rewards beta * (logp - ref_logp), or beta * mean token
    logp without a reference, plus `logps/chosen|rejected`; all detached."""
    if logps.ref_chosen is not None and logps.ref_rejected is not None:
        chosen = beta * (logps.chosen - logps.ref_chosen)
        rejected = beta * (logps.rejected - logps.ref_rejected)
    else:
        chosen = beta * logps.chosen / logps.chosen_tokens.clamp(min=1)
        rejected = beta * logps.rejected / logps.rejected_tokens.clamp(min=1)
    return {
        **score_pair_metrics(loss, chosen, rejected),
        "logps/chosen": logps.chosen.mean().detach(),
        "logps/rejected": logps.rejected.mean().detach(),
    }
