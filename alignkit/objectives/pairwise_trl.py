"""Pairwise losses that TRL offers as `DPOConfig.loss_type` values, written as pure functions.

Each matches the branch of the same meaning in TRL 1.16 `trl/trainer/dpo_trainer.py`
(`DPOTrainer._compute_loss`, the `for loss_type ...` loop); the TRL name is given in each
docstring. Notation as in `pairwise.py`: h = logp - ref (summed), delta_h = h_w - h_l.
Every function: fields of `logps` (B,) -> per-pair loss (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.objectives.pairwise import log_ratio_margin, log_ratios, smoothed_sigmoid_loss
from alignkit.objectives.registry import PairLogps, register_pairwise


@register_pairwise("exo")
def exo(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 1e-3) -> Tensor:
    """EXO-pref (Ji et al. 2024): "Towards Efficient Exact Optimization...", Eq. 16, K = 2:

        L = KL(q || p) = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),
        q_w = sigma(beta * delta_h), q_l = sigma(-beta * delta_h),

    i.e. the reverse KL from the policy's pair distribution to the smoothed label [1 - eps, eps].
    eps = `label_smoothing` must be > 0 (paper: 1e-3). Minimised at q_w = 1 - eps, so not
    monotone in delta_h. TRL `loss_type="exo_pair"`.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo needs label_smoothing in (0, 1), got {label_smoothing}")
    logits = beta * log_ratio_margin(logps)
    log_target_w = torch.log1p(torch.tensor(-label_smoothing, dtype=logits.dtype))
    log_target_l = torch.log(torch.tensor(label_smoothing, dtype=logits.dtype))
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - log_target_w.to(logits.device))
    rejected_term = torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - log_target_l.to(logits.device)
    )
    return chosen_term + rejected_term


@register_pairwise("nca")
def nca(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """NCA (Chen et al. 2024): "Noise Contrastive Alignment", pairwise form, r = beta * h:

        L = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l).

    Not monotone in h_w: it is minimised at sigma(r_w) = 2/3. TRL `loss_type="nca_pair"`.
    """
    chosen_logratio, rejected_logratio = log_ratios(logps)
    chosen_reward, rejected_reward = beta * chosen_logratio, beta * rejected_logratio
    return (
        -F.logsigmoid(chosen_reward)
        - 0.5 * F.logsigmoid(-chosen_reward)
        - 0.5 * F.logsigmoid(-rejected_reward)
    )


@register_pairwise("bco")
def bco(logps: PairLogps, beta: float = 0.1, delta: float | Tensor = 0.0) -> Tensor:
    """BCO (Jung et al. 2024): "Binary Classifier Optimization", pairwise form, r = beta * h:

        L = -log sigma(r_w - delta) - log sigma(-(r_l - delta)).

    `delta` is the paper's reward shift, a running mean of the rewards kept by the trainer (a
    detached scalar tensor or float). The loss stays pure, so the trainer supplies it; the
    default 0 gives TRL 1.16's `loss_type="bco_pair"`, which dropped the shift.
    """
    chosen_logratio, rejected_logratio = log_ratios(logps)
    chosen_reward, rejected_reward = beta * chosen_logratio, beta * rejected_logratio
    return -F.logsigmoid(chosen_reward - delta) - F.logsigmoid(-(rejected_reward - delta))


@register_pairwise("sppo_hard")
def sppo_hard(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """SPPO, hard labels (Wu et al. 2024): "Self-Play Preference Optimization", Eq. 4.7 with
    P(y_w > y_l) = 1, P(y_l > y_w) = 0:

        L = (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2.

    Regresses each log-ratio to a target, so it is not monotone. TRL `loss_type="sppo_hard"`.
    """
    chosen_logratio, rejected_logratio = log_ratios(logps)
    return (chosen_logratio - 0.5 / beta) ** 2 + (rejected_logratio + 0.5 / beta) ** 2


@register_pairwise("aot")
def aot(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """AOT, paired (Melnyk et al. 2024): "Distributional Preference Alignment of LLMs via
    Optimal Transport". Sort the policy margins m_i = logp_w,i - logp_l,i and the reference
    margins m_ref,i across the batch separately, then apply the (smoothed) DPO loss to the
    sorted differences d_(i) = m_(i) - m_ref,(i):

        L_i = -(1 - eps) log sigma(beta * d_(i)) - eps log sigma(-beta * d_(i)).

    BATCH-COUPLED: entry i is not the loss of pair i but of the i-th order statistic, so the
    result depends on the whole batch (and on how it is sharded); only its mean is meaningful,
    and per-pair weights (WPO) must not be applied to it. TRL `loss_type="aot"`.
    """
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError("aot needs reference log-probs (ref_chosen, ref_rejected)")
    policy_margin_sorted, _ = torch.sort(logps.chosen - logps.rejected, dim=0)
    ref_margin_sorted, _ = torch.sort(logps.ref_chosen - logps.ref_rejected, dim=0)
    return smoothed_sigmoid_loss(beta * (policy_margin_sorted - ref_margin_sorted), label_smoothing)


@register_pairwise("apo_zero")
def apo_zero(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7):

        L = (1 - sigma(beta * h_w)) + sigma(beta * h_l)

    (raise the chosen likelihood, lower the rejected one). TRL `loss_type="apo_zero"`.
    """
    chosen_logratio, rejected_logratio = log_ratios(logps)
    return (1 - torch.sigmoid(beta * chosen_logratio)) + torch.sigmoid(beta * rejected_logratio)


@register_pairwise("apo_down")
def apo_down(logps: PairLogps, beta: float = 0.1) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8):

        L = sigma(beta * h_w) + (1 - sigma(beta * (h_w - h_l)))

    (lower both likelihoods, the rejected one more). Deliberately not monotone in h_w: its
    first term pushes the chosen likelihood down. TRL `loss_type="apo_down"`.
    """
    chosen_logratio, rejected_logratio = log_ratios(logps)
    return torch.sigmoid(beta * chosen_logratio) + (
        1 - torch.sigmoid(beta * (chosen_logratio - rejected_logratio))
    )


@register_pairwise("discopop")
def discopop(logps: PairLogps, beta: float = 0.1, tau: float = 0.05) -> Tensor:
    """DiscoPOP (Lu et al. 2024): log-ratio modulated loss, "Discovering Preference
    Optimization Algorithms with and for LLMs", Eq. 5, z = beta * delta_h:

        L = (1 - sigma(z / tau)) * (-log sigma(z)) + sigma(z / tau) * exp(-z).

    A blend of the logistic (DPO) and exponential losses. Not monotone: it has a bump at small
    positive z (the paper's non-convex region). TRL `loss_type="discopop"` with `discopop_tau`.
    """
    logits = beta * log_ratio_margin(logps)
    modulation = torch.sigmoid(logits / tau)
    return (1 - modulation) * -F.logsigmoid(logits) + modulation * torch.exp(-logits)
