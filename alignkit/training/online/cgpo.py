"""CGPO (Xu et al. 2024, "The Perfect Blend: Redefining RLHF with Mixture of Judges", arXiv
2409.20370): a mixture of judges as constraints next to the reward, and two of the paper's
constrained optimisers as presets, CRPG (`cgpo_crpg`) and CRRAFT (`cgpo_crraft`).

Each step:

1. every sample is scored by the reward R (any `--reward` / `--reward-model`) and labelled by the
   judges of `--set judges=SPEC|SPEC|...` (`alignkit.rewards.constraints`: regex, json_valid,
   max_words, max_chars, judge:MODEL, or a function), psi_k = 1 when judge k is satisfied;
2. the reward the loop trains on is CRPG's constrained calibrated reward
   r~ = prod_k psi_k sigma(R(s, a) - R(s, a_bar))  (`objectives.cgpo.constrained_calibrated_reward`),
   a_bar the prompt's baseline response from `--set calibration_column=NAME` (the paper's
   pre-collected response; e.g. `chosen` or `completion`), or R(s, a_bar) = 0 without one;
3. CRPG's policy gradient  E[(r~ - b) grad log pi(a|s)]: REINFORCE (`policy_loss=reinforce`,
   one epoch, so the samples are on-policy) with the prompt group's mean r~ as the baseline b
   (`advantage=grpo, scale_by_std=false`; TRL's port subtracts the batch mean, also a baseline
   that leaves the expected gradient unchanged), token-mean aggregation (TRL's port: summed
   over tokens, divided by the batch's tokens);
4. regularisation: the loop's KL penalty in the reward (k1, beta 0.05), and optionally CRPG's KL
   threshold as in TRL's port, r~ <- r~ max(0, 1 - KL(s, a) / cgpo_kl_threshold), KL(s, a) the
   sample's summed log pi_old - log pi_ref (`kl_regularised`).

CRRAFT (`cgpo_crraft`, TRL's port cites eq. 18): per prompt, the sample with the highest r~ among
its group of 4 (`sample_filter=best_of_n` on r~), trained with the r~-weighted NLL
-r~ log pi(a_best|s) (`steps.sft_update`'s sample_weights); a prompt none of whose samples
satisfies every judge has r~ = 0 and adds nothing. TRL's port then falls back to the dataset's
response when that one satisfies the judges; alignkit does not (the group is dropped), and it
divides by the kept samples' tokens, not by the number of feasible prompts.

Every step logs `judges/<name>/violation_rate` (share of the step's samples that judge rejected),
`judges/feasible_rate` (samples satisfying all) and `judges/reward` (the mean raw reward R, before
calibration; `reward/mean` is the mean r~). Under torchrun every rank holds the step's gathered
batch: the rule judges label all of it on every rank, an LLM judge (`judge:MODEL`) its block of
rows, gathered, so the verdicts and rates are the global batch's on every rank.

Checked against TRL's CGPO port (huggingface/trl PR branch, `CGPOTrainer.crpg_optimization` and
`crraft_optimization`), whose equation numbers (eq. 18 for CRRAFT) are cited here; the paper's
full text was not available to this check.

Deviations, stated: the KL threshold is optional (off by default; the KL penalty regularises
instead), and one task only (the paper stratifies prompts by task, each with its own judges and
optimiser).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from alignkit.objectives.cgpo import constrained_calibrated_reward
from alignkit.rewards.base import call_reward
from alignkit.rewards.constraints import MixtureOfJudges
from alignkit.rewards.dense import DenseRewards
from alignkit.training.online.distributed_rollout import gather_rows, prompt_block
from alignkit.training.run.distributed import Ranks

METRIC_PREFIX = "judges/"
"""Drained scores under this prefix are logged under their own name, not as reward/NAME."""


class ConstrainedReward:
    """The reward role for CGPO: the wrapped role's score R, the judges' labels psi, and
    r~ = psi sigma(R - R(s, a_bar)) returned as the score (module docstring)."""

    def __init__(self, role: Any, judges: MixtureOfJudges, calibration_column: str | None = None,
                 ranks: Ranks | None = None) -> None:
        self.role, self.judges, self.calibration_column = role, judges, calibration_column
        self.ranks = ranks if ranks is not None else Ranks()
        self.model_backed = getattr(role, "model_backed", False)
        if calibration_column is not None and not callable(getattr(role, "fn", None)):
            raise ValueError(f"calibration_column={calibration_column} scores the baseline responses with the reward "
                             f"function; {type(role).__name__} scores token ids only: give the reward as --reward SPEC "
                             "(e.g. rm:DIR)")
        self._pending: dict[str, list[Tensor]] = {}

    @property
    def name(self) -> str:
        return str(getattr(self.role, "name", type(self.role).__name__))

    def baseline_rewards(self, prompts: list[Any], columns: dict[str, Any]) -> Tensor | None:
        """R(s, a_bar) of each row's baseline response (calibration_column), or None."""
        if self.calibration_column is None:
            return None
        if self.calibration_column not in columns or any(v is None for v in columns[self.calibration_column]):
            raise ValueError(f"calibration_column={self.calibration_column}: every prompt row needs that column (the "
                             f"baseline response); the rows have columns {sorted(columns)}")
        return call_reward(self.role.fn, prompts, list(columns[self.calibration_column]), **columns).float().cpu()

    def score(self, batch, prompts, completions, columns) -> tuple[Tensor, int]:
        scores, penalised = self.role.score(batch, prompts, completions, columns)
        if isinstance(scores, DenseRewards):
            raise ValueError(f"reward {self.name} gives per-token rewards; CGPO calibrates one reward per sample")
        rewards = scores.float().reshape(-1).cpu()
        satisfied = self.judges.satisfied(prompts, completions, columns,  # (N, K)
                                          model_verdicts=self._split_verdicts(prompts, completions, columns))
        shaped = constrained_calibrated_reward(rewards, satisfied, self.baseline_rewards(prompts, columns))
        rejected = (~satisfied).float()
        for index, name in enumerate(self.judges.names):
            self._pending.setdefault(f"{METRIC_PREFIX}{name}/violation_rate", []).append(rejected[:, index])
        self._pending.setdefault(f"{METRIC_PREFIX}feasible_rate", []).append(satisfied.all(-1).float())
        self._pending.setdefault(f"{METRIC_PREFIX}reward", []).append(rewards)
        return shaped.to(scores.device), penalised

    def _split_verdicts(self, prompts: list[Any], completions: list[Any], columns: dict[str, Any]):
        """Under torchrun, a model-backed judge's (N,) verdicts: each rank judges its block of the
        gathered batch's rows and the verdicts are gathered, so every rank holds all N (as the
        rule judges, which every rank runs on every row). One process: None (every row here)."""
        if not self.ranks.distributed:
            return None

        def verdicts(judge) -> Tensor:
            block = prompt_block(len(completions), self.ranks.rank, self.ranks.world)
            local = torch.zeros(0, dtype=torch.bool)
            if len(block):
                rows = slice(block.start, block.stop)
                local = judge.satisfied(prompts[rows], completions[rows], {k: v[rows] for k, v in columns.items()})
            return gather_rows(local.double().reshape(-1, 1), self.ranks, width=1).reshape(-1) > 0.5

        return verdicts

    def drain(self) -> dict[str, Tensor]:
        """Per-sample violation indicators (their mean is the rate), feasibility and raw reward
        since the last call, and whatever the wrapped role logs."""
        out = {name: torch.cat(parts) for name, parts in self._pending.items()}
        self._pending = {}
        inner = getattr(self.role, "drain", None)
        out.update(inner() if inner is not None else {})
        return out


def constrained_reward_role(role: Any, s, ranks: Ranks | None = None) -> Any:
    """`role` wrapped in `ConstrainedReward` when the settings name judges (cgpo), else `role`;
    under torchrun (`ranks`) an LLM judge labels each rank's rows (`_split_verdicts`)."""
    if not s.cgpo:
        return role
    return ConstrainedReward(role, MixtureOfJudges.from_spec(s.judges), s.calibration_column, ranks)


def kl_regularised(rewards: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """CRPG's KL factor (TRL's port): r~ max(0, 1 - KL / threshold), KL = sum_t (log pi_old -
    log pi_ref) over each sample's response tokens.

    Shapes: rewards (N,), old_logp / ref_logp / mask (N, L) -> (N,).
    Worked example: r~ = 0.8, KL = 2, threshold 8 -> 0.8 x 0.75 = 0.6; KL >= 8 -> 0.
    """
    kl = torch.where(mask.bool(), old_logp - ref_logp, 0.0).sum(-1)  # (N,)
    return rewards * torch.clamp(1.0 - kl / threshold, min=0.0).to(rewards)


def validate_cgpo(s, preset: str) -> None:
    """cgpo needs judges; judges, calibration_column and cgpo_kl_threshold are cgpo's only."""
    if s.cgpo and not s.judges:
        raise ValueError(f"{preset}: CGPO constrains the reward with judges: --set judges=SPEC|SPEC (e.g. "
                         "'regex:^Answer|json_valid|judge:smollm2-135m')")
    if not s.cgpo and (s.judges or s.calibration_column or s.cgpo_kl_threshold is not None):
        raise ValueError(f"{preset}: judges, calibration_column and cgpo_kl_threshold belong to CGPO: train cgpo_crpg "
                         "(or --set cgpo=true)")
    if s.cgpo and s.objective not in ("policy_gradient", "sft"):
        raise ValueError(f"{preset}: cgpo's constrained reward drives a policy gradient (CRPG) or a reward-weighted "
                         f"NLL (CRRAFT, objective=sft); got objective={s.objective}")
    if s.cgpo and s.objective == "sft" and (s.reward_norm or s.missing_eos_penalty is not None):
        raise ValueError(f"{preset}: CRRAFT weighs each NLL by r~ in [0, 1]; reward_norm and missing_eos_penalty would "
                         "shift it below 0 (turn them off, or add a max_words/regex judge for the format)")
    if s.cgpo_kl_threshold is not None and not s.cgpo_kl_threshold > 0:
        raise ValueError(f"{preset}: cgpo_kl_threshold must be > 0 nats, got {s.cgpo_kl_threshold}")


__all__ = ["ConstrainedReward", "constrained_reward_role", "kl_regularised", "validate_cgpo"]
