"""Properties every registered pairwise loss must have (the whole PAIRWISE registry).

Monotonicity in the chosen log-prob: d loss / d logp_w <= 0 for every loss except those that
regress to a finite target or deliberately lower the chosen likelihood (NON_MONOTONE, each with
a point where the gradient is positive, so the exemption is tested too).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.objectives import PAIRWISE, REFERENCE_FREE, PairLogps

B = 4
HPARAMS = {"modpo": {"weights": [0.5, 0.3, 0.2]}}  # losses with a required hyper-parameter

# the gradient w.r.t. chosen is < 0 everywhere (hinge and aot: <= 0 / flat once satisfied)
STRICTLY_MONOTONE = {
    "dpo", "rdpo", "sigmoid_norm", "rpo", "modpo", "bco", "apo_zero",
    "simpo", "cpo", "orpo", "cpl", "fdpo",
}  # fmt: skip
WEAKLY_MONOTONE = {"hinge", "aot"}
# loss -> (hparams, delta_h or (h_w, h_l) at which d loss / d logp_w > 0, and why)
NON_MONOTONE = {
    "cdpo": ({"beta": 1.0, "label_smoothing": 0.1}, (5.0, 0.0)),  # optimum at s(x) = 1 - eps
    "exo": ({"beta": 1.0, "label_smoothing": 0.1}, (5.0, 0.0)),  # optimum at q_w = 1 - eps
    "ipo": ({"beta": 1.0}, (5.0, 0.0)),  # regresses the margin to 1/(2 beta)
    "sppo_hard": ({"beta": 1.0}, (5.0, 0.0)),  # regresses h_w to 1/(2 beta)
    "nca": ({"beta": 1.0}, (5.0, 0.0)),  # optimum at s(beta h_w) = 2/3
    "apo_down": ({"beta": 1.0}, (0.0, -20.0)),  # lowers the chosen likelihood by design
    "discopop": ({"beta": 1.0}, (0.0, 0.0)),  # bump near z = 0 (tau = 0.05)
}


def test_every_loss_is_classified():
    assert set(PAIRWISE) == STRICTLY_MONOTONE | WEAKLY_MONOTONE | set(NON_MONOTONE)
    assert REFERENCE_FREE == {"simpo", "cpo", "orpo", "cpl"}


def random_pairs(seed: int, scale: float) -> PairLogps:
    gen = torch.Generator().manual_seed(seed)

    def logps():
        return -torch.rand(B, generator=gen, dtype=torch.float64) * scale - 1e-3

    return PairLogps(
        chosen=logps().requires_grad_(),
        rejected=logps().requires_grad_(),
        chosen_tokens=torch.randint(1, 40, (B,), generator=gen).double(),
        rejected_tokens=torch.randint(1, 40, (B,), generator=gen).double(),
        ref_chosen=logps(),
        ref_rejected=logps(),
        margins=torch.randn(B, 2, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("name", sorted(PAIRWISE))
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 200.0))
def test_finite_shape_and_gradient_sign(name, seed, scale):
    logps = random_pairs(seed, scale)
    loss = PAIRWISE[name](logps, **HPARAMS.get(name, {}))
    assert loss.shape == (B,)
    assert loss.dtype == torch.float64
    assert torch.isfinite(loss).all()
    grad_chosen, grad_rejected = torch.autograd.grad(loss.sum(), (logps.chosen, logps.rejected))
    assert torch.isfinite(grad_chosen).all() and torch.isfinite(grad_rejected).all()
    if name in STRICTLY_MONOTONE | WEAKLY_MONOTONE:
        assert (grad_chosen <= 0).all(), grad_chosen


@pytest.mark.parametrize("name", sorted(STRICTLY_MONOTONE))
def test_strictly_decreasing_in_chosen_at_moderate_margins(name):
    logps = random_pairs(0, 3.0)
    loss = PAIRWISE[name](logps, **HPARAMS.get(name, {}))
    (grad_chosen,) = torch.autograd.grad(loss.sum(), logps.chosen)
    assert (grad_chosen < 0).all(), grad_chosen


@pytest.mark.parametrize("name", sorted(NON_MONOTONE))
def test_non_monotone_losses_have_a_positive_chosen_gradient(name):
    hparams, (chosen_logratio, rejected_logratio) = NON_MONOTONE[name]
    chosen = torch.tensor([chosen_logratio], dtype=torch.float64, requires_grad=True)
    logps = PairLogps(
        chosen=chosen,
        rejected=torch.tensor([rejected_logratio], dtype=torch.float64),
        chosen_tokens=torch.ones(1, dtype=torch.float64),
        rejected_tokens=torch.ones(1, dtype=torch.float64),
        ref_chosen=torch.zeros(1, dtype=torch.float64),
        ref_rejected=torch.zeros(1, dtype=torch.float64),
    )
    (grad_chosen,) = torch.autograd.grad(PAIRWISE[name](logps, **hparams).sum(), chosen)
    assert grad_chosen.item() > 0


@pytest.mark.parametrize("name", ["dpo", "cdpo", "rdpo", "sigmoid_norm", "fdpo"])
def test_log2_when_policy_equals_reference(name):
    logps = random_pairs(3, 10.0)
    at_reference = PairLogps(
        chosen=logps.chosen,
        rejected=logps.rejected,
        chosen_tokens=logps.chosen_tokens,
        rejected_tokens=logps.rejected_tokens,
        ref_chosen=logps.chosen.detach(),
        ref_rejected=logps.rejected.detach(),
    )
    expected = torch.full((B,), math.log(2), dtype=torch.float64)
    torch.testing.assert_close(PAIRWISE[name](at_reference), expected)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_fdpo_log2_at_reference_for_every_divergence(divergence):
    logps = random_pairs(4, 10.0)
    at_reference = PairLogps(
        logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens,
        logps.chosen.detach(), logps.rejected.detach(),
    )  # fmt: skip
    loss = PAIRWISE["fdpo"](at_reference, divergence=divergence)
    torch.testing.assert_close(loss, torch.full((B,), math.log(2), dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_losses_ignore_the_reference(name):
    logps = random_pairs(5, 20.0)
    without_reference = PairLogps(
        logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens
    )
    torch.testing.assert_close(PAIRWISE[name](without_reference), PAIRWISE[name](logps))


@pytest.mark.parametrize("name", sorted(PAIRWISE))
def test_pure_under_vmap(name):
    """vmap over an extra leading dimension: fails on .item(), data-dependent Python control
    flow or in-place tricks, and each slice must equal the unbatched call."""
    stacked = [random_pairs(seed, 20.0).map(torch.Tensor.detach) for seed in range(3)]
    fields = ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "ref_chosen",
              "ref_rejected", "margins")  # fmt: skip
    columns = [torch.stack([getattr(p, f) for p in stacked]) for f in fields]
    hparams = HPARAMS.get(name, {})
    batched = torch.func.vmap(lambda *cols: PAIRWISE[name](PairLogps(*cols), **hparams))(*columns)
    for index, logps in enumerate(stacked):
        torch.testing.assert_close(batched[index], PAIRWISE[name](logps, **hparams))
