"""f-DPO (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
Diverse Divergence Constraints"): regularising with an f-divergence instead of reverse KL makes
the implicit reward beta * f'(pi/pi_ref) (+ a prompt-only term that cancels in the pair
difference), so DPO becomes

    L = -log sigma( beta * [f'(u_w) - f'(u_l)] ),   u = pi_theta(y|x) / pi_ref(y|x) = exp(h).

Reverse KL (f'(u) = log u + 1) gives back DPO exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.objectives.pairwise import log_ratios
from alignkit.objectives.registry import PairLogps, register_pairwise

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")

# exp((alpha - 1) h) is clamped at exp(this) so it stays representable (TRL does the same).
_EXP_CLAMP = {torch.float16: 11.0}
_DEFAULT_EXP_CLAMP = 80.0


def f_divergence_score(log_ratio: Tensor, divergence: str, alpha_div: float = 0.5) -> Tensor:
    """f'(u) at u = exp(log_ratio), up to an additive constant (which cancels in f-DPO).

    - "reverse_kl": f(u) = u log u,   f'(u) ~ log u            (DPO)
    - "forward_kl": f(u) = -log u,    f'(u) ~ 1 - 1/u
    - "js":         Jensen-Shannon,   f'(u) = log(2u / (1 + u)) = log 2 + log sigma(log u)
    - "alpha":      f'(u) = (u^(alpha_div - 1) - 1) / (alpha_div - 1); alpha_div -> 1 is reverse
      KL, alpha_div = 0 is forward KL. This is TRL's `f_alpha_divergence_coef` convention; the
      paper's alpha is 1 - alpha_div (they coincide at the default 0.5).

    Shapes: log_ratio (...) -> (...). Matches TRL 1.16 `DPOTrainer._compute_loss`
    (`f_divergence_type` branches), whose names are reverse_kl / forward_kl / js_divergence /
    alpha_divergence.
    """
    if divergence == "reverse_kl":
        return log_ratio
    if divergence == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if divergence == "js":
        return math.log(2) + F.logsigmoid(log_ratio)
    if divergence == "alpha":
        if abs(alpha_div - 1.0) < 1e-6:  # the limit (u^(a-1) - 1)/(a-1) -> log u
            return log_ratio
        exponent = ((alpha_div - 1.0) * log_ratio).clamp(
            max=_EXP_CLAMP.get(log_ratio.dtype, _DEFAULT_EXP_CLAMP)
        )
        return torch.expm1(exponent) / (alpha_div - 1.0)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


@register_pairwise("fdpo")
def f_divergence_dpo(
    logps: PairLogps, beta: float = 0.1, divergence: str = "reverse_kl", alpha_div: float = 0.5
) -> Tensor:
    """f-DPO (Wang et al. 2023): L = -log sigma(beta * [f'(u_w) - f'(u_l)]), f' from
    `f_divergence_score`.

    `divergence` in {"reverse_kl", "forward_kl", "js", "alpha"}; `alpha_div` is used only by
    "alpha". Shapes: fields (B,) -> (B,). Matches TRL's `loss_type="sigmoid"` with
    `f_divergence_type` set.
    """
    chosen_logratio, rejected_logratio = log_ratios(logps)
    chosen_score = f_divergence_score(chosen_logratio, divergence, alpha_div)
    rejected_score = f_divergence_score(rejected_logratio, divergence, alpha_div)
    return -F.logsigmoid(beta * (chosen_score - rejected_score))
