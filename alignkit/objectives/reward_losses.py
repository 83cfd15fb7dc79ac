"""Reward-model losses and score aggregations beyond plain Bradley-Terry (ALGORITHMS.md §1).

Pure functions of score tensors and keyword hyper-parameters. Losses return per-example
values (B,) (callers average); aggregations return one score per row (B,). No `.item()`,
no config objects.

- `plackett_luce`, `all_pairs_bradley_terry`: K responses per prompt (§1.2, InstructGPT).
- `ENSEMBLE_AGGREGATIONS`: mean / wco / uwo over k ensemble members (§1.4, addendum §9).
- `brme_bradley_terry`, `brme_reward`: multi-head Gaussian reward model (§1.5, addendum §8).
- `cost_model_loss`: Safe RLHF cost model (§1.7).
- `preference_bce`, `symmetrize_preference`: pairwise preference model (§1.3).
- `segment_reward_loss`: fine-grained per-segment rewards (§1.8).
- `gaussian_kl_standard_normal`: the KL term of VPL's negative ELBO (rm_vpl).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_listwise(scores: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    if scores.dim() != 2 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must both be (B, K); got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask must be (B, K) like scores; got {tuple(mask.shape)}")
    return mask.bool()


def plackett_luce(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plackett-Luce ranking loss (Plackett 1975; Luce 1959; ALGORITHMS.md §1.2).

    For the ranking y_(1) > ... > y_(K) given by descending `labels`,

        L = -sum_{k=1}^{K} [ r_(k) - log sum_{j : label_j <= label_(k)} exp(r_j) ]

    i.e. each item against the items not ranked strictly above it. Without ties this is
    exactly -log prod_{k<K} exp(r_(k)) / sum_{j>=k} exp(r_(j)) (the last term is log 1 = 0),
    and K = 2 is Bradley-Terry. Ties use Breslow's convention: tied items share one
    denominator that holds all of them, so neither is ranked above the other.

    Worked example: r = (2, 1, 0), labels (3, 2, 1):
    L = -(2 - log(e^2 + e^1 + e^0)) - (1 - log(e^1 + e^0)) = 0.4076 + 0.3133 = 0.7209.

    Shapes: scores, labels, mask (B, K) (mask False = no such response); returns (B,).
    """
    mask = _check_listwise(scores, labels, mask)
    # (B, K, K): at_or_below[b, k, j] = item j is not ranked above item k (and exists)
    at_or_below = (labels.unsqueeze(1) <= labels.unsqueeze(2)) & mask.unsqueeze(1)
    expanded = scores.unsqueeze(1).expand(-1, scores.shape[1], -1)
    log_denominator = torch.logsumexp(expanded.masked_fill(~at_or_below, float("-inf")), dim=-1)
    terms = (scores - log_denominator).masked_fill(~mask, 0.0)  # (B, K)
    return -terms.sum(dim=-1)


def all_pairs_bradley_terry(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """All C(K, 2) pairs of one prompt as one example (InstructGPT, Ouyang et al. 2022 §3.5).

        L = (1 / |P|) sum_{(i, j) in P} -log sigma(r_i - r_j),  P = {(i, j): label_i > label_j}

    InstructGPT puts every pair of a prompt's K responses in the same batch element so the
    correlated pairs make one gradient step, not K(K-1)/2 (which overfits). Tied pairs are
    not in P. A row with no ordered pair gives 0.

    Worked example: r = (2, 1, 0), labels (3, 2, 1): pairs (2-1, 2-0, 1-0) ->
    (0.3133 + 0.1269 + 0.3133) / 3 = 0.2512.

    Shapes: scores, labels, mask (B, K); returns (B,).
    """
    mask = _check_listwise(scores, labels, mask)
    ordered = (labels.unsqueeze(2) > labels.unsqueeze(1)) & mask.unsqueeze(2) & mask.unsqueeze(1)
    difference = scores.unsqueeze(2) - scores.unsqueeze(1)  # (B, K, K): r_i - r_j
    losses = (-F.logsigmoid(difference)).masked_fill(~ordered, 0.0)
    count = ordered.sum(dim=(1, 2))
    return losses.sum(dim=(1, 2)) / count.clamp(min=1)


RANKED_LOSSES: dict[str, Callable[..., Tensor]] = {
    "plackett_luce": plackett_luce,
    "all_pairs": all_pairs_bradley_terry,
}


# --------------------------------------------------------------------------- ensembles


def ensemble_mean(member_scores: Tensor, **_: float) -> Tensor:
    """Mean objective (Coste et al. 2023): R = (1/k) sum_i r_i. (B, k) -> (B,).

    Worked example: r = (1, 2, 6) -> 3.
    """
    return member_scores.mean(dim=-1)


def ensemble_wco(member_scores: Tensor, **_: float) -> Tensor:
    """Worst-case optimisation (Coste et al. 2023): R = min_i r_i. (B, k) -> (B,).

    Worked example: r = (1, 2, 6) -> 1.
    """
    return member_scores.min(dim=-1).values


def ensemble_uwo(member_scores: Tensor, uwo_lambda: float = 0.5, unbiased: bool = False) -> Tensor:
    """Uncertainty-weighted optimisation (Coste et al. 2023): R = mean_i r_i - lambda Var_i r_i.

    Variance, not standard deviation. `unbiased=False` divides by k (numpy, the reference
    best-of-n code; the default here), `unbiased=True` by k - 1 (torch, the reference PPO
    code); addendum §9. lambda defaults to the reference best-of-n value 0.5; its PPO
    config uses 0.1.

    Worked example: r = (1, 2, 6), lambda = 0.5: mean 3, population Var = (4 + 1 + 9)/3
    = 14/3, R = 3 - 7/3 = 0.6667; unbiased Var = 7, R = -0.5.

    Shapes: (B, k) -> (B,).
    """
    mean = member_scores.mean(dim=-1)
    variance = member_scores.var(dim=-1, unbiased=unbiased)
    return mean - uwo_lambda * variance


ENSEMBLE_AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "mean": ensemble_mean,
    "wco": ensemble_wco,
    "uwo": ensemble_uwo,
}


# --------------------------------------------------------------------------- BRME


def brme_bradley_terry(
    chosen_mean: Tensor,
    chosen_log_std: Tensor,
    rejected_mean: Tensor,
    rejected_log_std: Tensor,
    chosen_noise: Tensor,
    rejected_noise: Tensor,
) -> Tensor:
    """BRME head training (Yan et al. 2024, "Reward-Robust RLHF"; ALGORITHMS.md §1.5).

    Each head i gives a Gaussian N(mu_i, sigma_i^2) over rewards; a reparameterised sample
    r_i = mu_i + sigma_i * eps_i is trained with Bradley-Terry, averaged over the H heads:

        L = (1/H) sum_i -log sigma(r_i(x, y_w) - r_i(x, y_l)).

    NOT PINNED DOWN (addendum §8): the paper's head-training schedule (a single BT stage as
    here, or an extra MSE/calibration stage) was not available. Note that BT alone rewards
    small sigma (noise only blurs the margin), so the sigmas are not calibrated by this loss.
    The noise is an argument so the function stays pure and testable.

    Worked example (H = 1): mu_w = 1, mu_l = 0, log sigma = 0, eps_w = 0.5, eps_l = -0.5:
    r_w - r_l = 2, L = -log sigma(2) = 0.1269.

    Shapes: every argument (B, H); returns (B,).
    """
    chosen = chosen_mean + chosen_log_std.exp() * chosen_noise
    rejected = rejected_mean + rejected_log_std.exp() * rejected_noise
    return -F.logsigmoid(chosen - rejected).mean(dim=-1)


def brme_reward(head_means: Tensor, head_log_stds: Tensor, lambda_: float) -> Tensor:
    """BRME reward (Yan et al. 2024): R = lambda r_nominal + (1 - lambda) min_i mu_i.

    r_nominal is the mean of the most confident head (smallest sigma) per row. lambda has
    no default on purpose: the paper's value is not pinned down (addendum §8).

    Worked example: mu = (1, 3, 2), log sigma = (0.5, -1, 0), lambda = 0.5:
    nominal = 3 (head 2 has the smallest sigma), min = 1, R = 2.

    Shapes: (B, H) each -> (B,).
    """
    nominal = head_means.gather(-1, head_log_stds.argmin(dim=-1, keepdim=True)).squeeze(-1)
    return lambda_ * nominal + (1.0 - lambda_) * head_means.min(dim=-1).values


# --------------------------------------------------------------------------- safety cost


def cost_model_loss(
    safer_costs: Tensor,
    unsafer_costs: Tensor,
    safer_is_safe: Tensor,
    unsafer_is_safe: Tensor,
    reg: float = 0.0,
) -> Tensor:
    """Safe RLHF cost model loss (Dai et al. 2023; safe-rlhf `values/cost/trainer.py`).

        L = -log sigma(C(y_u) - C(y_s)) - log sigma(s_s C(y_s)) - log sigma(s_u C(y_u))
            + reg (C(y_s)^2 + C(y_u)^2)

    y_s is the safer response (the `chosen` column), y_u the less safe one (`rejected`).
    Sign convention: s = +1 for a harmful response and -1 for a safe one, so the loss pushes
    C > 0 for harmful and C < 0 for safe responses: **cost > 0 means harmful**. (safe-rlhf
    stores `safety_sign` +1 safe / -1 unsafe and negates it; `*_is_safe` here is that
    label as a bool.)

    Worked example: C_s = -1 (safe), C_u = 1 (harmful), reg = 0:
    -log sigma(2) - log sigma(1) - log sigma(1) = 0.1269 + 0.3133 + 0.3133 = 0.7535.

    Shapes: all (B,) (is_safe bool or 0/1); returns (B,).
    """
    safer_sign = 1.0 - 2.0 * safer_is_safe.to(safer_costs.dtype)  # +1 harmful, -1 safe
    unsafer_sign = 1.0 - 2.0 * unsafer_is_safe.to(unsafer_costs.dtype)
    loss = (
        -F.logsigmoid(unsafer_costs - safer_costs)
        - F.logsigmoid(safer_sign * safer_costs)
        - F.logsigmoid(unsafer_sign * unsafer_costs)
    )
    if reg:
        loss = loss + reg * (safer_costs.square() + unsafer_costs.square())
    return loss


# --------------------------------------------------------------------------- preference model


def preference_bce(logits_chosen_first: Tensor, logits_rejected_first: Tensor) -> Tensor:
    """Pairwise preference model, both orders (general preference model; ALGORITHMS.md §1.3).

    The model reads (x, y_a, y_b) in one sequence and outputs logit l(a, b) with
    P(a > b | x) = sigma(l). Each pair is seen in both orders with labels 1 and 0:

        L = (1/2) [ -log sigma(l(w, l)) - log(1 - sigma(l(l, w))) ]

    which teaches antisymmetry P(a > b) = 1 - P(b > a) and cancels position bias.

    Worked example: l(w, l) = 2, l(l, w) = -1: (0.1269 + 0.3133) / 2 = 0.2201.

    Shapes: (B,) each; returns (B,).
    """
    chosen_first = F.binary_cross_entropy_with_logits(
        logits_chosen_first, torch.ones_like(logits_chosen_first), reduction="none"
    )
    rejected_first = F.binary_cross_entropy_with_logits(
        logits_rejected_first, torch.zeros_like(logits_rejected_first), reduction="none"
    )
    return 0.5 * (chosen_first + rejected_first)


def symmetrize_preference(prob_ab: Tensor, prob_ba: Tensor) -> Tensor:
    """Symmetrised preference: P(a > b) = (p(a, b) + 1 - p(b, a)) / 2 (antisymmetric by
    construction: swapping a and b gives 1 - P).

    Worked example: p(a, b) = 0.8, p(b, a) = 0.4 -> (0.8 + 0.6) / 2 = 0.7.
    """
    return 0.5 * (prob_ab + 1.0 - prob_ba)


# --------------------------------------------------------------------------- segments


def segment_reward_loss(
    token_scores: Tensor, segment_labels: Tensor, segment_mask: Tensor, kind: str = "bce"
) -> Tensor:
    """Per-segment reward-model loss (Wu et al. 2023, Fine-Grained RLHF; ALGORITHMS.md §1.8).

    The model scores every token; only the last token of each segment (sentence or
    sub-sentence) carries a label. `kind="bce"`: labels in {0, 1} (1 = no error in the
    segment), L = mean over labelled tokens of BCE(sigma(score), label) -- the binary form of
    the reference token classifiers; `kind="mse"`: real-valued labels, (score - label)^2.

    Worked example (bce): scores (0, 2) at two segment ends with labels (1, 0):
    (log 2 + log(1 + e^2)) / 2 = (0.6931 + 2.1269) / 2 = 1.41.

    Shapes: token_scores, segment_labels (B, T) float, segment_mask (B, T) bool;
    returns (B,) (0 for a row with no labelled segment).
    """
    if kind == "bce":
        per_token = F.binary_cross_entropy_with_logits(
            token_scores, segment_labels.to(token_scores.dtype), reduction="none"
        )
    elif kind == "mse":
        per_token = (token_scores - segment_labels.to(token_scores.dtype)).square()
    else:
        raise ValueError(f"segment loss kind must be 'bce' or 'mse'; got {kind!r}")
    mask = segment_mask.to(per_token.dtype)
    return (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


# --------------------------------------------------------------------------- VPL


def gaussian_kl_standard_normal(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, diag s^2) || N(0, I)) per row, the KL term of VPL's negative ELBO (Poddar et al.
    2024, "Personalizing RLHF with Variational Preference Learning"):

        KL = 0.5 sum_d (mu_d^2 + s_d^2 - 1 - log s_d^2),
        L_VPL = mean_i -log sigma(r(x_i, y_w, z_i) - r(x_i, y_l, z_i)) + kl_weight * mean_i KL_i.

    Checked against WEIRDLabUW/vpl_llm (hidden_context/vae_utils.py, VAETrainer.compute_loss):
    it uses -sum(1 + log s^2 - mu^2 - s^2) summed over the batch, i.e. 2 B x this mean, so its
    kl_loss_weight w corresponds to kl_weight = 2 B w here.

    Worked example: mu = (1, 0), log s^2 = (0, log 2): 0.5 ((1 + 1 - 1 - 0) + (0 + 2 - 1 - 0.6931))
    = 0.5 (1 + 0.3069) = 0.6534.

    Shapes: mean, log_var (B, L); returns (B,).
    """
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(dim=-1)
