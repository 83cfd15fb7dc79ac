"""Policy-gradient losses and loss aggregations for the online loop (pure, registered by name).

`POLICY_LOSSES[name](logp, old_logp, advantages, **hparams) -> (loss (B, T), clipped (B, T))`
gives a per-token loss and a per-token "clipping was active" indicator (bool); nothing is
masked or averaged inside. `AGGREGATIONS[name](per_token, mask, **norm) -> scalar` turns a
per-token loss into the scalar that is differentiated; the choice matters (GRPO vs DAPO vs
Dr. GRPO differ mostly there, ALGORITHMS.md §0 pitfall 5).

Every aggregation is a masked sum divided by a normaliser. The normaliser can be passed in
(`num_tokens`, `num_seqs`), so a minibatch split into micro-batches gives exactly the loss of
the whole minibatch when the micro-batch losses are summed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}
AGGREGATIONS: dict[str, Callable[..., Tensor]] = {}

# exp(20) ~ 5e8: larger log-ratios only come from numerical accidents (verl clamps the same).
_MAX_LOG_RATIO = 20.0


def register_policy_loss(name: str):
    """Decorator: register `fn(logp, old_logp, advantages, **hp) -> (loss, clipped)`, all (B, T)."""

    def decorate(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = fn
        return fn

    return decorate


def register_aggregation(name: str):
    """Decorator: register `fn(per_token (B, T), mask (B, T), **norm) -> scalar`."""

    def decorate(fn):
        if name in AGGREGATIONS:
            raise ValueError(f"aggregation {name!r} is registered twice")
        AGGREGATIONS[name] = fn
        return fn

    return decorate


def _check(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    assert len(shape) == 2, f"expected (B, T) tensors, got {tuple(shape)}"
    for tensor in tensors[1:]:
        assert tensor.shape == shape, f"shape mismatch: {tuple(tensor.shape)} vs {tuple(shape)}"


# --------------------------------------------------------------------------- policy losses


@register_policy_loss("ppo_clip")
def ppo_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017), asymmetric clip (DAPO, Yu et al. 2025).

    rho_t = exp(logp_t - old_logp_t);
    L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high)).
    `eps_high` defaults to `eps_low` (symmetric PPO); DAPO's clip-higher uses 0.28.
    With `clip_ratio_c` (dual clip, Ye et al. 2020; verl default 3.0), tokens with A_t < 0
    get L_t = min(L_t, -A_t c), bounding the loss when rho is huge.

    Shapes: logp, old_logp, advantages (B, T) -> (loss (B, T), clipped (B, T) bool), where
    `clipped` marks tokens whose gradient the clip (or dual clip) removed. At rho = 1 the loss
    is -A_t.
    """
    _check(logp, old_logp, advantages)
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp((logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if clip_ratio_c is not None:
        assert clip_ratio_c > 1.0, f"clip_ratio_c must be > 1, got {clip_ratio_c}"
        bound = -advantages * clip_ratio_c
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        clipped = clipped | dual
    return loss, clipped


@register_policy_loss("dual_clip")
def dual_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    clip_ratio_c: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Dual-clip PPO (Ye et al. 2020): `ppo_clip` with the lower bound -A c for A < 0, c = 3.

    Shapes: as `ppo_clip`.
    """
    return ppo_clip(
        logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c
    )


@register_policy_loss("reinforce")
def reinforce(logp: Tensor, old_logp: Tensor, advantages: Tensor) -> tuple[Tensor, Tensor]:
    """Plain REINFORCE (Williams 1992): L_t = -A_t logp_t; no ratio, nothing clipped.

    Its gradient equals the PPO surrogate's at rho = 1 (exactly on-policy). `old_logp` is
    accepted for the common signature and ignored.

    Shapes: (B, T) -> (loss (B, T), clipped (B, T) all False).
    """
    _check(logp, old_logp, advantages)
    return -advantages * logp, torch.zeros_like(logp, dtype=torch.bool)


def truncated_importance_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor,
                                 cap: float) -> tuple[Tensor, dict[str, float]]:
    """Token-level truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"): the rollout engine samples from
    pi_rollout, which differs from the trainer's pi_old by kernels and precision, so each
    token's policy-gradient loss is weighted by

        w_t = min(pi_old(y_t) / pi_rollout(y_t), C) = min(exp(old_logp_t - rollout_logp_t), C),

    detached (a constant of the update). Returns (w (B, T), 0 where `mask` is False; metrics:
    the mean ratio before truncation and the fraction of tokens truncated)."""
    _check(old_logp, rollout_logp)
    if cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    log_ratio = (old_logp.detach() - rollout_logp.detach()).clamp(max=_MAX_LOG_RATIO)
    ratio = torch.where(mask, log_ratio.exp(), torch.zeros_like(log_ratio))
    weights = ratio.clamp(max=cap)
    tokens = mask.sum().clamp(min=1)
    return weights, {"rollout/tis_ratio_mean": (ratio.sum() / tokens).item(),
                     "rollout/tis_truncated_fraction": ((ratio > cap) & mask).sum().item() / tokens.item()}


# --------------------------------------------------------------------------- aggregations


def _masked_sum_rows(per_token: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), per_token, 0.0).sum(-1)  # (B,)


@register_aggregation("token_mean")
def token_mean(per_token: Tensor, mask: Tensor, *, num_tokens: float | Tensor | None = None, **_) -> Tensor:
    """sum_{i,t} m l / sum_{i,t} m: every token of the batch weighs the same (DAPO, PPO).

    `num_tokens` overrides the denominator (the minibatch's token count for micro-batches).
    """
    _check(per_token, mask)
    denominator = mask.bool().sum() if num_tokens is None else num_tokens
    return _masked_sum_rows(per_token, mask).sum() / max_one(denominator)


@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(
    per_token: Tensor, mask: Tensor, *, num_seqs: float | Tensor | None = None, **_
) -> Tensor:
    """(1/G) sum_i (1/|o_i|) sum_t m l: GRPO's per-sequence mean (length-biased, Dr. GRPO).

    Sequences with no valid token contribute 0; `num_seqs` overrides G.
    """
    _check(per_token, mask)
    lengths = mask.bool().sum(-1)
    per_seq = _masked_sum_rows(per_token, mask) / lengths.clamp(min=1)
    denominator = (lengths > 0).sum() if num_seqs is None else num_seqs
    return per_seq.sum() / max_one(denominator)


@register_aggregation("seq_mean_token_sum")
def seq_mean_token_sum(
    per_token: Tensor, mask: Tensor, *, num_seqs: float | Tensor | None = None, **_
) -> Tensor:
    """(1/G) sum_i sum_t m l: the sequence-level REINFORCE sum, averaged over sequences.

    Sequences with no valid token are not counted in G (as in `seq_mean_token_mean`);
    `num_seqs` overrides G.
    """
    _check(per_token, mask)
    denominator = (mask.bool().sum(-1) > 0).sum() if num_seqs is None else num_seqs
    return _masked_sum_rows(per_token, mask).sum() / max_one(denominator)


@register_aggregation("constant_norm")
def constant_norm(
    per_token: Tensor,
    mask: Tensor,
    *,
    max_len: int | None = None,
    num_seqs: float | Tensor | None = None,
    **_,
) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): sum_{i,t} m l / (G * L_max), L_max a constant (the maximum
    completion length), so neither length nor batch composition rescales a token's gradient.

    `max_len` defaults to the tensor's T; `num_seqs` overrides G.
    """
    _check(per_token, mask)
    length = per_token.shape[1] if max_len is None else max_len
    sequences = per_token.shape[0] if num_seqs is None else num_seqs
    return _masked_sum_rows(per_token, mask).sum() / (max_one(sequences) * length)


def max_one(value: float | Tensor) -> float | Tensor:
    """max(value, 1) for a Python number or a tensor (empty batches divide by 1, not 0)."""
    return value.clamp(min=1) if torch.is_tensor(value) else max(value, 1)


__all__ = [
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "constant_norm",
    "dual_clip",
    "ppo_clip",
    "register_aggregation",
    "register_policy_loss",
    "reinforce",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "token_mean",
]

from alignkit.objectives import policy_more as _policy_more  # noqa: E402,F401  (fills POLICY_LOSSES)
