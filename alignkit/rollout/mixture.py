"""Sampling a token-level geometric mixture of two causal LMs (Nash-MD's opponent, Munos et al.
2023, "Nash Learning from Human Feedback"; TRL's GeometricMixtureWrapper):

    pi_mix(y_t | s_t) ∝ pi_theta(y_t | s_t)^(1 - alpha) pi_ref(y_t | s_t)^alpha
                      = softmax(alpha z_ref + (1 - alpha) z_theta)_y_t,

z the logits at s_t (each model's log-partition cancels in the softmax). `MixtureEngine` is
`HFEngine`'s decode loop with one KV cache per model: every step runs both forwards and
samples from the mixed logits, with the same counter-based noise, stop handling and row
dropping. The returned log-probs are the mixture's. The reference is a separate frozen model,
or the policy itself with its LoRA adapter switched off.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from alignkit.models import adapter_disabled
from alignkit.rollout.hf_engine import HFEngine, _new_cache


class PairCache:
    """The two models' caches, kept row-aligned: the decode loop repeats and drops rows of both."""

    def __init__(self, policy: Any, reference: Any) -> None:
        self.policy, self.reference = policy, reference

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.policy.batch_repeat_interleave(repeats)
        self.reference.batch_repeat_interleave(repeats)

    def batch_select_indices(self, rows: Tensor) -> None:
        self.policy.batch_select_indices(rows)
        self.reference.batch_select_indices(rows)


def mix_logits(policy_logits: Tensor, reference_logits: Tensor, alpha: float) -> Tensor:
    """alpha z_ref + (1 - alpha) z_theta: logits of the geometric mixture, (rows, V)."""
    return alpha * reference_logits.float() + (1.0 - alpha) * policy_logits.float()


class MixtureEngine(HFEngine):
    """Samples pi_mix of `model` and `reference` (None: `model` with its adapter off) with
    coefficient `alpha` (0: the policy itself, 1: the reference)."""

    def __init__(self, model: nn.Module, reference: nn.Module | None, alpha: float, **kwargs: Any) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"mixture_coef must be in [0, 1], got {alpha}")
        super().__init__(model, preallocate_cache=False, **kwargs)
        self.reference, self.alpha = reference, float(alpha)

    def _new_cache(self) -> PairCache:
        return PairCache(_new_cache(self.model), _new_cache(self.reference or self.model))

    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor,
                 cache: PairCache, **model_inputs: Tensor) -> Tensor:
        policy = self._model_forward(self.model, input_ids, attention_mask, position_ids, cache.policy,
                                     **model_inputs)
        if self.reference is None:
            with adapter_disabled(self.model):
                reference = self._model_forward(self.model, input_ids, attention_mask, position_ids,
                                                cache.reference, **model_inputs)
        else:
            reference = self._model_forward(self.reference, input_ids, attention_mask, position_ids,
                                             cache.reference, **model_inputs)
        return mix_logits(policy, reference, self.alpha)
