"""T-REG, token-level reward regularisation (Zhou et al. 2025, "T-REG: Preference Optimization
with Token-Level Reward Regularization", ACL 2025, arXiv 2412.02685; ALGORITHMS-addendum §2).

EVIDENCE. The official code (wzhouad/T-REG) and the paper's method section could not be
obtained. The equations below are the ones two independent summaries of the paper agree on
(both state the token reward, the regulariser, the sequence weight and the total loss in the
same form); the choices they leave open are options here, with the default we derive:

1. Token rewards from contrastive prompting, by a frozen evaluator (the reference policy):

       r_t = sigma( log pi_eval(y_t | x_better, y_<t) - log pi_eval(y_t | x_worse, y_<t) ) - 1/2

   in (-1/2, 1/2); x_better / x_worse wrap the prompt with opposite instructions (helpful,
   correct, coherent, concise vs unhelpful, incorrect, incoherent, verbose). The exact
   templates are not known: ours are in `alignkit.training.offline.treg` and can be replaced.

2. The regulariser makes the implicit token reward of the base loss, c_t log pi_theta(y_t)
   (c_t = beta for DPO, whose token reward is beta log pi/pi_ref), agree with r_t by maximising
   sum_t r_t * c_t log(pi_theta / pi_ref)(y_t). Its theta-gradient does not involve pi_ref, so
   it is the token-weighted language-modelling loss

       L_REG(x, y) = - sum_t c_t * r_t * log pi_theta(y_t | x, y_<t)      (a sum, as derived)

3. Each pair's regulariser is weighted by the coefficient of the base loss's own gradient,
   w = sigma(-m) for L_base = -log sigma(m) (for DPO m = beta * delta_h, so
   w = sigma(r(x, y_l) - r(x, y_w))). w is a weight, not a training signal: it is detached.

       L = L_base + alpha * w * ( L_REG(x, y_w) + L_REG(x, y_l) )

`base="simpo"` is the paper's SimPO-REG: m = beta/|y_w| logp_w - beta/|y_l| logp_l - gamma and
c_t = beta/|y| (SimPO's implicit token reward), no reference model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.objectives.pairwise import log_ratio_margin, per_token
from alignkit.objectives.registry import PairLogps

BASES = ("dpo", "simpo")


def contrastive_token_rewards(better_logps: Tensor, worse_logps: Tensor) -> Tensor:
    """r_t = sigma(log pi(y_t | x_better, y_<t) - log pi(y_t | x_worse, y_<t)) - 1/2.

    Any matching shapes (e.g. (T,) per response); values in (-1/2, 1/2), 0 where both
    log-probs agree (including the zeros of padding).
    """
    return torch.sigmoid(better_logps - worse_logps) - 0.5


def base_margin(logps: PairLogps, base: str, beta: float, gamma: float) -> Tensor:
    """m of L_base = -log sigma(m), (B,): beta * delta_h (dpo) or SimPO's length-averaged margin."""
    if base == "dpo":
        return beta * log_ratio_margin(logps)
    if base == "simpo":
        chosen = per_token(logps.chosen, logps.chosen_tokens)
        rejected = per_token(logps.rejected, logps.rejected_tokens)
        return beta * (chosen - rejected) - gamma
    raise ValueError(f"treg: base must be one of {BASES}, got {base!r}")


def token_reward_coefficients(logps: PairLogps, base: str, beta: float) -> tuple[Tensor, Tensor]:
    """c for (y_w, y_l), each (B,): the factor of log pi_theta(y_t) in the base's token reward."""
    if base == "simpo":
        return beta / logps.chosen_tokens.clamp(min=1), beta / logps.rejected_tokens.clamp(min=1)
    full = torch.full_like(logps.chosen, beta)
    return full, full


def token_reward_regulariser(weighted_logp: Tensor, coefficient: Tensor) -> Tensor:
    """L_REG(x, y) = -c * sum_t r_t log pi_theta(y_t | x, y_<t), given the reward-weighted sum
    `weighted_logp` = sum_t r_t log pi_theta(y_t) (B,) and c (B,) -> (B,)."""
    return -coefficient * weighted_logp


def treg(
    logps: PairLogps,
    chosen_weighted: Tensor,
    rejected_weighted: Tensor,
    beta: float = 0.1,
    alpha: float = 0.25,
    base: str = "dpo",
    gamma: float = 0.5,
) -> Tensor:
    """T-REG (Zhou et al. 2025, T-REG: Preference Optimization with Token-Level Reward Regularization):

        L = -log sigma(m) + alpha * sg(sigma(-m)) * (L_REG(x, y_w) + L_REG(x, y_l))

    `logps` (B,) fields as for DPO (SimPO needs no reference); `chosen_weighted` /
    `rejected_weighted` (B,) are sum_t r_t log pi_theta(y_t) with the contrastive token rewards
    r_t. `alpha` is the regulariser weight (the paper searched 0.1, 0.25, 0.5), `gamma` the
    SimPO margin (base="simpo" only). Returns the per-pair loss (B,).
    With all r_t = 0 it is the base loss exactly.
    """
    margin = base_margin(logps, base, beta, gamma)
    weight = torch.sigmoid(-margin).detach()
    coef_w, coef_l = token_reward_coefficients(logps, base, beta)
    regulariser = token_reward_regulariser(chosen_weighted, coef_w) + token_reward_regulariser(
        rejected_weighted, coef_l
    )
    return -F.logsigmoid(margin) + alpha * weight * regulariser
