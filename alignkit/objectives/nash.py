"""Game-theoretic preference losses of the online loop: INPO (Zhang et al., ICLR 2025,
"Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret
Learning"), pinned from the ICLR camera-ready text (ALGORITHMS-addendum.md section 1).

The online mirror-descent step pi_{t+1} = argmin <grad l_t(pi_t), pi> + eta KL(pi || pi_t), with
l_t(pi) = -E P(y > pi_t) + tau KL(pi || pi_ref), has the closed form
pi_{t+1}(y) ∝ pi_t(y)^{1 - tau/eta} pi_ref(y)^{tau/eta} exp(P(y > pi_t) / eta) (0 <= tau < eta),
which INPO reaches by a regression over oracle-ordered pairs (y_w, y_l) sampled from pi_t:

    h = Delta_theta - (tau / eta) Delta_ref - (1 - tau / eta) Delta_t,
    L = mean over pairs of (h - 1 / (2 eta))^2,

Delta_m = log pi_m(y_w | x) - log pi_m(y_l | x) (summed response log-probs). In the online loop
pi_t is the policy that sampled the step's responses (its log-probs are the old log-probs),
so each training step is one INPO iteration on fresh on-policy pairs.
"""

from __future__ import annotations

from torch import Tensor


def inpo_h(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
           prev_chosen: Tensor, prev_rejected: Tensor, eta: float, tau: float) -> Tensor:
    """h = Delta_theta - (tau / eta) Delta_ref - (1 - tau / eta) Delta_t per pair: (B,) each -> (B,)."""
    ratio = tau / eta
    return ((chosen - rejected) - ratio * (ref_chosen - ref_rejected)
            - (1.0 - ratio) * (prev_chosen - prev_rejected))


def inpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
              prev_chosen: Tensor, prev_rejected: Tensor, eta: float, tau: float) -> Tensor:
    """(h - 1 / (2 eta))^2 per pair, h = `inpo_h`: (B,)."""
    h = inpo_h(chosen, rejected, ref_chosen, ref_rejected, prev_chosen, prev_rejected, eta, tau)
    return (h - 1.0 / (2.0 * eta)) ** 2
