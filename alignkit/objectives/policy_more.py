"""Policy losses beyond the clipped surrogate: sequence-level ratios (GSPO), clipped importance
weights (CISPO), a soft gate (SAPO) and the covariance-based entropy controls (Clip-Cov,
KL-Cov). Registered in `POLICY_LOSSES` with the same contract as `policy.py`:
`fn(logp, old_logp, advantages, **hparams) -> (loss (B, T), clipped (B, T) bool)`, nothing
averaged inside. Losses that need to know which tokens are real take `mask` (B, T) bool; the
online step passes it to every loss whose signature names it.

Numerically matched (tests/test_policy_losses_more.py): `gspo`, `cispo` and `sapo` against
TRL 1.16's GRPOTrainer (`importance_sampling_level="sequence"`, `loss_type="cispo"`,
`loss_type="sapo"`), `clip_cov` and `kl_cov` against verl's `compute_policy_loss_clip_cov` /
`compute_policy_loss_kl_cov` (their equations, re-derived in the tests' worked examples).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.objectives.policy import _MAX_LOG_RATIO, _check, register_policy_loss


def _log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _masked_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """mean over the valid tokens of each row: (B, T) -> (B, 1)."""
    mask = mask.bool()
    return (torch.where(mask, values, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)


@register_policy_loss("gspo")
def gspo(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, mask: Tensor, gspo_eps_low: float = 3e-4,
         gspo_eps_high: float = 4e-4) -> tuple[Tensor, Tensor]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one importance ratio per
    sequence, the geometric mean of its token ratios,

        s_i = exp((1/|y_i|) sum_t (logp_t - old_logp_t)),
        L_i = max(-A_i s_i, -A_i clip(s_i, 1 - gspo_eps_low, 1 + gspo_eps_high)),

    written per token in the paper's GSPO-token form, s_i,t = sg[s_i] pi(y_t) / sg[pi(y_t)]:
    every token of row i carries the value L_i, and with `seq_mean_token_mean` aggregation the
    gradient is exactly the sequence form's (-A_i s_i (1/|y_i|) sum_t grad logp_t, unclipped);
    per-token advantages (A_i,t) are also accepted, as the token form allows. The clip range
    is its own (the paper's 3e-4 / 4e-4: sequence ratios stay far closer to 1 than token
    ratios), not PPO's eps_low / eps_high.

    Shapes: logp, old_logp, advantages, mask (B, T) -> (loss (B, T), clipped (B, T) bool).
    """
    _check(logp, old_logp, advantages, mask)
    sequence = _masked_token_mean(_log_ratio(logp, old_logp).detach(), mask)  # (B, 1)
    ratio = torch.exp((logp - logp.detach() + sequence).clamp(max=_MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - gspo_eps_low, 1.0 + gspo_eps_high)
    return torch.maximum(unclipped, clipped_loss), clipped_loss > unclipped


@register_policy_loss("cispo")
def cispo(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, cispo_max: float = 5.0,
          cispo_min: float | None = None) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1, 2025; the ScaleRL form): REINFORCE weighted by a clipped,
    detached importance ratio, so no token's gradient is dropped:

        L_t = -sg(clip(r_t, cispo_min, cispo_max)) A_t logp_t,   r_t = exp(logp_t - old_logp_t).

    `cispo_max` is an absolute bound (ScaleRL's eps_max, 5.0; TRL's epsilon_high for
    loss_type="cispo"); `cispo_min` (MiniMax's 1 - eps_low) defaults to no lower bound.
    `clipped` marks tokens whose weight the upper bound cut while A_t > 0 (TRL's
    cispo_clip_ratio), or the lower bound with A_t < 0. At r = 1 the gradient is REINFORCE's.

    Shapes: (B, T) -> (loss (B, T), clipped (B, T) bool).
    """
    _check(logp, old_logp, advantages)
    if cispo_min is not None and not cispo_min < cispo_max:
        raise ValueError(f"cispo_min must be below cispo_max, got {cispo_min} and {cispo_max}")
    ratio = torch.exp(_log_ratio(logp, old_logp)).detach()
    weight = ratio.clamp(min=cispo_min, max=cispo_max)
    clipped = (ratio > cispo_max) & (advantages > 0)
    if cispo_min is not None:
        clipped = clipped | ((ratio < cispo_min) & (advantages < 0))
    return -weight * advantages * logp, clipped


@register_policy_loss("sapo")
def sapo(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, sapo_tau_pos: float = 1.0,
         sapo_tau_neg: float = 1.05) -> tuple[Tensor, Tensor]:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization"): the hard clip replaced by a
    smooth gate whose slope is 1 at r = 1 and decays away from it,

        f_tau(r) = (4 / tau) sigmoid(tau (r - 1)),   L_t = -f_tau(r_t) A_t,
        tau = sapo_tau_pos where A_t > 0, else sapo_tau_neg (1.0 / 1.05: TRL's defaults).

    d f / d r at r = 1 is 1, so on-policy the gradient equals the plain policy gradient.
    Nothing is clipped outright: `clipped` marks tokens whose gate has fallen below half its
    on-policy slope (|tau (r - 1)| > 1.76), for the clip_ratio metric.

    Shapes: (B, T) -> (loss (B, T), clipped (B, T) bool).
    """
    _check(logp, old_logp, advantages)
    tau = torch.where(advantages > 0, sapo_tau_pos, sapo_tau_neg).to(logp.dtype)
    ratio = torch.exp(_log_ratio(logp, old_logp))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    slope = 4.0 * torch.sigmoid(tau * (ratio - 1.0)) * torch.sigmoid(-tau * (ratio - 1.0))
    return -gate * advantages, slope.detach() < 0.5


def _centred_covariance(advantages: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """cov_t = (A_t - mean A)(logp_t - mean logp), means over the valid tokens; detached."""
    mask = mask.bool()
    count = mask.sum().clamp(min=1)
    a, lp = advantages.detach(), logp.detach()
    mean_a = torch.where(mask, a, 0.0).sum() / count
    mean_lp = torch.where(mask, lp, 0.0).sum() / count
    return (a - mean_a) * (lp - mean_lp)


@register_policy_loss("clip_cov")
def clip_cov(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, mask: Tensor, eps_low: float = 0.2,
             eps_high: float | None = None, cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0,
             clip_cov_ub: float = 5.0, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning
    Language Models"; verl's clip_cov): entropy collapses through tokens whose log-prob and
    advantage covary strongly, so a small random share of them is taken out of the gradient.

        cov_t = (A_t - mean A)(logp_t - mean logp)         (valid tokens, this micro-batch)
        candidates: lb < cov_t < ub, valid, not already clipped by the PPO clip
        drop max(1, floor(cov_ratio * #valid)) candidates at random: L_t = 0 there
        elsewhere L_t = the PPO clipped surrogate (eps_low / eps_high).

    `generator` draws the candidates; None: torch's global generator, whose state checkpoints
    save and restore per rank, so a resumed run drops the same tokens. `clipped` = the PPO-clipped tokens and the dropped ones.

    Shapes: logp, old_logp, advantages, mask (B, T) -> (loss (B, T), clipped (B, T) bool).
    """
    _check(logp, old_logp, advantages, mask)
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.bool()
    ratio = torch.exp(_log_ratio(logp, old_logp))
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped_by_ppo = (clipped_loss > unclipped) & mask
    cov = _centred_covariance(advantages, logp, mask)
    candidates = torch.nonzero((cov > clip_cov_lb) & (cov < clip_cov_ub) & mask & ~clipped_by_ppo)
    count = max(int(cov_ratio * int(mask.sum())), 1)
    drop = torch.zeros_like(mask)
    if len(candidates):
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count].to(candidates.device)]
        drop[chosen[:, 0], chosen[:, 1]] = True
    loss = torch.where(drop, 0.0, torch.maximum(unclipped, clipped_loss))
    return loss, clipped_by_ppo | drop


@register_policy_loss("kl_cov")
def kl_cov(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, mask: Tensor, cov_ratio: float = 2e-4,
           kl_cov_coef: float = 1.0) -> tuple[Tensor, Tensor]:
    """KL-Cov (Cui et al. 2025; verl's kl_cov): no clip; the top `cov_ratio` share of valid
    tokens by covariance (at least one) get a KL penalty on their ratio instead,

        L_t = -A_t r_t + kl_cov_coef |logp_t - old_logp_t|   (the top-k tokens by cov_t)
        L_t = -A_t r_t                                        (every other token),

    cov_t as in `clip_cov`. `clipped` marks the penalised tokens.

    Shapes: logp, old_logp, advantages, mask (B, T) -> (loss (B, T), clipped (B, T) bool).
    """
    _check(logp, old_logp, advantages, mask)
    mask = mask.bool()
    log_ratio = _log_ratio(logp, old_logp)
    loss = -advantages * torch.exp(log_ratio)
    valid = int(mask.sum())
    penalised = torch.zeros_like(mask)
    if valid:
        cov = torch.where(mask, _centred_covariance(advantages, logp, mask), -torch.inf).flatten()
        top = torch.topk(cov, max(1, int(valid * cov_ratio))).indices
        penalised.view(-1)[top] = True
    return torch.where(penalised, loss + kl_cov_coef * log_ratio.abs(), loss), penalised


__all__ = ["cispo", "clip_cov", "gspo", "kl_cov", "sapo"]
