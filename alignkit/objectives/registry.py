"""Registries of pure loss functions, and the containers they take.

Every registered function is a pure function of tensors and keyword hyper-parameters:
no config objects, no `.item()`, no hidden aggregation. Callers aggregate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import Tensor


@dataclass(frozen=True)
class PairLogps:
    """Summed response log-probs of a batch of preference pairs. Every field is (B,).

    `ref_chosen` / `ref_rejected` are None for reference-free losses. `margins` (B, K)
    carries reward differences r_k(x, y_w) - r_k(x, y_l) of other objectives (MODPO).
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    margins: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> PairLogps:
        """Apply `fn` to every tensor field (e.g. `.to(float64)`), keeping the Nones."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PairLogps(**{k: (fn(v) if v is not None else None) for k, v in values.items()})


PairwiseLoss = Callable[..., Tensor]
PAIRWISE: dict[str, PairwiseLoss] = {}
REFERENCE_FREE: set[str] = set()
"""Names of PAIRWISE losses that never read `ref_chosen` / `ref_rejected`."""
KL: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}


def register_pairwise(
    name: str, *, reference_free: bool = False
) -> Callable[[PairwiseLoss], PairwiseLoss]:
    """Decorator: register `fn(logps: PairLogps, **hparams) -> Tensor (B,)` under `name`.

    `reference_free=True` tells the trainer never to load or compute a reference model.
    """

    def decorate(fn: PairwiseLoss) -> PairwiseLoss:
        if name in PAIRWISE:
            raise ValueError(f"pairwise loss {name!r} is registered twice")
        PAIRWISE[name] = fn
        if reference_free:
            REFERENCE_FREE.add(name)
        return fn

    return decorate


def register_kl(name: str):
    """Decorator: register a per-token KL estimator `fn(logp, ref_logp) -> (B, T)`."""

    def decorate(fn):
        if name in KL:
            raise ValueError(f"KL estimator {name!r} is registered twice")
        KL[name] = fn
        return fn

    return decorate
