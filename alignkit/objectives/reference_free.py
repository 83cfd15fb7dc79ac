"""Reference-free pairwise losses: SimPO, CPO, ORPO, CPL. They read only `chosen`,
`rejected` and the token counts of `PairLogps`; `ref_chosen` / `ref_rejected` may be None.
Every function: fields of `logps` (B,) -> per-pair loss (B,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.objectives.pairwise import chosen_mean_nll, per_token, smoothed_sigmoid_loss
from alignkit.objectives.registry import PairLogps, register_pairwise


@register_pairwise("simpo", reference_free=True)
def simpo(
    logps: PairLogps, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0
) -> Tensor:
    """SimPO (Meng et al. 2024): Eq. 6, reference-free, length-averaged log-probs:

        L = -log sigma( beta/|y_w| * logp_w - beta/|y_l| * logp_l - gamma ).

    `gamma` is the target reward margin itself (SimPO's code sets gamma = beta * gamma_beta_ratio
    with defaults beta 2.0, ratio 0.25, hence gamma 0.5). Matches TRL CPOTrainer.cpo_loss with
    `loss_type="simpo"` (which subtracts simpo_gamma / beta before scaling by beta) and
    cpo_alpha = 0; `label_smoothing` as in cDPO (default 0, the paper's loss).
    """
    chosen_avg = per_token(logps.chosen, logps.chosen_tokens)
    rejected_avg = per_token(logps.rejected, logps.rejected_tokens)
    return smoothed_sigmoid_loss(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)


@register_pairwise("cpo", reference_free=True)
def cpo(
    logps: PairLogps, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0
) -> Tensor:
    """CPO (Xu et al. 2024): "Contrastive Preference Optimization", Eq. 3 + NLL regulariser:

        L = -log sigma(beta * (logp_w - logp_l)) + alpha * (-logp_w / |y_w|)

    (summed log-probs in the preference term). Preference term = TRL CPOTrainer.cpo_loss,
    `loss_type="sigmoid"`. Deviation: TRL's NLL is token-averaged over the whole batch's chosen
    tokens; ours is per-sequence (-logp_w/|y_w|), so the two agree exactly when all chosen
    responses in a batch have the same length.
    """
    preference = smoothed_sigmoid_loss(beta * (logps.chosen - logps.rejected), label_smoothing)
    return preference + alpha * chosen_mean_nll(logps)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register_pairwise("orpo", reference_free=True)
def orpo(logps: PairLogps, lambda_: float = 0.1) -> Tensor:
    """ORPO (Hong et al. 2024): Eqs. 4-7, with length-averaged log-probs a = logp / |y|:

        log odds(y) = a - log(1 - exp(a)),
        L = -a_w + lambda_ * (-log sigma(log odds(y_w) - log odds(y_l))).

    `lambda_` is the paper's lambda (TRL ORPOConfig calls it `beta`, default 0.1). The odds
    term matches TRL ORPOTrainer.odds_ratio_loss; the NLL here is on the response tokens only
    (TRL's comment says it uses the full prompt + response). Average log-probs are clamped just
    below 0 so a response with probability 1 gives a finite loss rather than inf.
    """
    tiny = torch.finfo(logps.chosen.dtype).tiny
    chosen_avg = per_token(logps.chosen, logps.chosen_tokens).clamp(max=-tiny)
    rejected_avg = per_token(logps.rejected, logps.rejected_tokens).clamp(max=-tiny)
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return chosen_mean_nll(logps) - lambda_ * F.logsigmoid(log_odds)


@register_pairwise("cpl", reference_free=True)
def cpl(
    logps: PairLogps, beta: float = 1.0, lambda_: float = 1.0, bc_weight: float = 0.0
) -> Tensor:
    """CPL (Hejna et al. 2024): "Contrastive Preference Learning", segment = response, with
    segment scores S = beta * logp (summed; the paper's alpha, discount gamma = 1):

        L = -log [ exp(S_w) / (exp(S_w) + exp(lambda_ * S_l)) ] + bc_weight * (-logp_w / |y_w|)
          = softplus(lambda_ * S_l - S_w) + bc_weight * NLL_w.

    `lambda_` in (0, 1] is the conservative bias on the dis-preferred segment. Defaults are those
    of jhejna/cpl `research/algs/cpl.py` (alpha 1.0, bias 1.0, bc_coeff 0); the paper tunes them.
    The BC term here is on the chosen response, length-normalised.
    """
    chosen_score, rejected_score = beta * logps.chosen, beta * logps.rejected
    return F.softplus(lambda_ * rejected_score - chosen_score) + bc_weight * chosen_mean_nll(logps)
