"""Worked examples for every pairwise loss and option: numbers computed by hand in each docstring.

Useful identities: -log sigma(ln 3) = ln(4/3), -log sigma(-ln 3) = ln 4, sigma(ln 3) = 3/4.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.objectives import (
    PAIRWISE,
    PairLogps,
    combine_losses,
    f_divergence_score,
    ld_dpo,
    log_sum_squared_probs,
    wpo_weights,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def pairs(
    chosen,
    rejected,
    ref_chosen=None,
    ref_rejected=None,
    chosen_tokens=None,
    rejected_tokens=None,
    margins=None,
):
    chosen, rejected = t(*chosen), t(*rejected)
    ones = torch.ones_like(chosen)
    return PairLogps(
        chosen=chosen,
        rejected=rejected,
        chosen_tokens=ones if chosen_tokens is None else t(*chosen_tokens),
        rejected_tokens=ones if rejected_tokens is None else t(*rejected_tokens),
        ref_chosen=None if ref_chosen is None else t(*ref_chosen),
        ref_rejected=None if ref_rejected is None else t(*ref_rejected),
        margins=margins,
    )


def margin_pairs(delta_h):
    """Pairs with reference 0 and rejected 0, so h_w = delta_h, h_l = 0."""
    return pairs(delta_h, (0.0,) * len(delta_h), (0.0,) * len(delta_h), (0.0,) * len(delta_h))


def check(loss, expected):
    torch.testing.assert_close(loss, t(*expected))


def test_dpo_worked_example():
    """beta 0.5, delta_h = (0, 2 ln3, -2 ln3) -> beta delta_h = (0, ln3, -ln3)
    -> -log sigma = (ln 2, ln 4/3, ln 4)."""
    check(
        PAIRWISE["dpo"](margin_pairs((0.0, 2 * LN3, -2 * LN3)), beta=0.5),
        (LN2, math.log(4 / 3), LN4),
    )


def test_cdpo_worked_example():
    """eps 0.25, beta 1, x = (0, ln3, -ln3): 0.75 (-log s(x)) + 0.25 (-log s(-x))
    = (ln2, 0.75 ln4/3 + 0.25 ln4, 0.75 ln4 + 0.25 ln4/3)."""
    loss = PAIRWISE["cdpo"](margin_pairs((0.0, LN3, -LN3)), beta=1.0, label_smoothing=0.25)
    check(loss, (LN2, 0.75 * math.log(4 / 3) + 0.25 * LN4, 0.75 * LN4 + 0.25 * math.log(4 / 3)))


def test_rdpo_worked_example():
    """eps 0.25: (0.75 A - 0.25 B) / 0.5 with A = -log s(x), B = -log s(-x):
    x=0 -> ln2 ; x=ln3 -> 1.5 ln4/3 - 0.5 ln4 ; x=-ln3 -> 1.5 ln4 - 0.5 ln4/3."""
    loss = PAIRWISE["rdpo"](margin_pairs((0.0, LN3, -LN3)), beta=1.0, label_smoothing=0.25)
    check(loss, (LN2, 1.5 * math.log(4 / 3) - 0.5 * LN4, 1.5 * LN4 - 0.5 * math.log(4 / 3)))
    with pytest.raises(ValueError):
        PAIRWISE["rdpo"](margin_pairs((0.0,)), label_smoothing=0.5)


def test_ipo_worked_example():
    """beta 0.5 -> target 1/(2*0.5) = 1. h_w/|y_w| = (4/2, 6/3, 0/1) = (2, 2, 0),
    h_l/|y_l| = (0/1, -3/3, 2/2) = (0, -1, 1); margins (2, 3, -1); loss (1, 4, 4)."""
    logps = pairs((4.0, 6.0, 0.0), (0.0, -3.0, 2.0), (0.0,) * 3, (0.0,) * 3, (2, 3, 1), (1, 3, 2))
    check(PAIRWISE["ipo"](logps, beta=0.5), (1.0, 4.0, 4.0))


def test_hinge_worked_example():
    """beta 0.5, delta_h = (0, 1, 4): relu(1 - (0, 0.5, 2)) = (1, 0.5, 0)."""
    check(PAIRWISE["hinge"](margin_pairs((0.0, 1.0, 4.0)), beta=0.5), (1.0, 0.5, 0.0))


def test_sigmoid_norm_worked_example():
    """beta 1, h_w/|y_w| = (2/2, 4ln3/4, 0/1), h_l/|y_l| = (2/2, 0/1, 3ln3/3):
    normalised margins (0, ln3, -ln3) -> (ln2, ln4/3, ln4)."""
    logps = pairs(
        (2.0, 4 * LN3, 0.0), (2.0, 0.0, 3 * LN3), (0.0,) * 3, (0.0,) * 3, (2, 4, 1), (2, 1, 3)
    )
    check(PAIRWISE["sigmoid_norm"](logps, beta=1.0), (LN2, math.log(4 / 3), LN4))


def test_rpo_worked_example():
    """beta 0.5, alpha 0.5; chosen (-2, -4, -6) over (1, 2, 3) tokens -> NLL (2, 2, 2);
    refs set delta_h = (0, 2ln3, -2ln3) -> DPO (ln2, ln4/3, ln4); loss = DPO + 0.5*2."""
    chosen = (-2.0, -4.0, -6.0)
    ref_chosen = tuple(c - d for c, d in zip(chosen, (0.0, 2 * LN3, -2 * LN3), strict=True))
    logps = pairs(chosen, (-1.0,) * 3, ref_chosen, (-1.0,) * 3, (1, 2, 3))
    check(PAIRWISE["rpo"](logps, beta=0.5, alpha=0.5), (LN2 + 1, math.log(4 / 3) + 1, LN4 + 1))


def test_modpo_worked_example():
    """weights (w0, w1, w2) = (0.5, 1, 2), beta 1, delta_h = (1, 2, 0),
    margins ((1, 0), (0.5, 0.5), (0, -ln3/4)) -> w_rest.m = (1, 1.5, -ln3/2);
    (delta_h - w.m)/w0 = (0, 1, ln3) -> (ln2, ln(1 + e^-1), ln4/3)."""
    margins = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, -LN3 / 4]], dtype=torch.float64)
    logps = pairs((1.0, 2.0, 0.0), (0.0,) * 3, (0.0,) * 3, (0.0,) * 3, margins=margins)
    loss = PAIRWISE["modpo"](logps, weights=[0.5, 1.0, 2.0], beta=1.0)
    check(loss, (LN2, math.log1p(math.exp(-1)), math.log(4 / 3)))
    with pytest.raises(ValueError):
        PAIRWISE["modpo"](logps, weights=[0.5, 1.0])  # K = 2 margins need 3 weights


def test_exo_worked_example():
    """eps 0.25, x = (0, ln3, -ln3): q_w = (1/2, 3/4, 1/4);
    KL(q || [0.75, 0.25]) = (0.5 ln(2/3) + 0.5 ln2, 0, 0.25 ln(1/3) + 0.75 ln3)
    = (0.5 ln4/3, 0, 0.5 ln3)."""
    loss = PAIRWISE["exo"](margin_pairs((0.0, LN3, -LN3)), beta=1.0, label_smoothing=0.25)
    check(loss, (0.5 * math.log(4 / 3), 0.0, 0.5 * LN3))


def test_nca_worked_example():
    """beta 1, (h_w, h_l) = (0,0), (ln3,0), (0,ln3):
    -log s(r_w) - 0.5 log s(-r_w) - 0.5 log s(-r_l) =
    (ln2 + 0.5ln2 + 0.5ln2, ln4/3 + 0.5ln4 + 0.5ln2, ln2 + 0.5ln2 + 0.5ln4)."""
    logps = pairs((0.0, LN3, 0.0), (0.0, 0.0, LN3), (0.0,) * 3, (0.0,) * 3)
    check(PAIRWISE["nca"](logps, beta=1.0), (2 * LN2, math.log(4 / 3) + 1.5 * LN2, 2.5 * LN2))


def test_bco_worked_example():
    """beta 1, delta ln3, (h_w, h_l) = (0,0), (ln3,ln3), (2ln3,0):
    -log s(h_w - ln3) - log s(ln3 - h_l) = (ln4 + ln4/3, 2 ln2, 2 ln4/3); delta 0 row 1 = 2 ln2."""
    logps = pairs((0.0, LN3, 2 * LN3), (0.0, LN3, 0.0), (0.0,) * 3, (0.0,) * 3)
    four_thirds = math.log(4 / 3)
    check(
        PAIRWISE["bco"](logps, beta=1.0, delta=LN3), (LN4 + four_thirds, 2 * LN2, 2 * four_thirds)
    )
    assert PAIRWISE["bco"](logps, beta=1.0)[0].item() == pytest.approx(2 * LN2)


def test_sppo_hard_worked_example():
    """beta 0.5 -> targets +-1. (h_w, h_l) = (1,-1), (3,0), (0,1):
    (h_w - 1)^2 + (h_l + 1)^2 = (0, 4 + 1, 1 + 4)."""
    logps = pairs((1.0, 3.0, 0.0), (-1.0, 0.0, 1.0), (0.0,) * 3, (0.0,) * 3)
    check(PAIRWISE["sppo_hard"](logps, beta=0.5), (0.0, 5.0, 5.0))


def test_aot_worked_example_sorts_across_the_batch():
    """beta 1, eps 0. Policy margins (2, 0, 1) sort to (0, 1, 2); reference margins
    (1, 2+ln3, -ln3) sort to (-ln3, 1, 2+ln3); sorted differences (ln3, 0, -ln3)
    -> (ln4/3, ln2, ln4). (Unsorted per-pair differences would be (1, -2-ln3, 1+ln3).)"""
    logps = pairs((2.0, 0.0, 1.0), (0.0,) * 3, (1.0, 2 + LN3, -LN3), (0.0,) * 3)
    check(PAIRWISE["aot"](logps, beta=1.0), (math.log(4 / 3), LN2, LN4))


def test_apo_zero_worked_example():
    """beta 1, (h_w, h_l) = (0,0), (ln3,0), (0,ln3): (1 - s(h_w)) + s(h_l) = (1, 0.75, 1.25)."""
    logps = pairs((0.0, LN3, 0.0), (0.0, 0.0, LN3), (0.0,) * 3, (0.0,) * 3)
    check(PAIRWISE["apo_zero"](logps, beta=1.0), (1.0, 0.75, 1.25))


def test_apo_down_worked_example():
    """beta 1, same pairs: s(h_w) + 1 - s(h_w - h_l) = (0.5+0.5, 0.75+0.25, 0.5+0.75)."""
    logps = pairs((0.0, LN3, 0.0), (0.0, 0.0, LN3), (0.0,) * 3, (0.0,) * 3)
    check(PAIRWISE["apo_down"](logps, beta=1.0), (1.0, 1.0, 1.25))


def test_discopop_worked_example():
    """beta 1, tau 1, x = (0, ln3, -ln3): m = s(x) = (1/2, 3/4, 1/4), logistic (ln2, ln4/3, ln4),
    exp(-x) = (1, 1/3, 3): (1-m) logistic + m exp = (0.5ln2 + 0.5, 0.25ln4/3 + 0.25, 0.75ln4 + 0.75)."""
    loss = PAIRWISE["discopop"](margin_pairs((0.0, LN3, -LN3)), beta=1.0, tau=1.0)
    check(loss, (0.5 * LN2 + 0.5, 0.25 * math.log(4 / 3) + 0.25, 0.75 * LN4 + 0.75))


def test_simpo_worked_example():
    """beta 2, gamma 1. chosen (-1, -2, -3) / (2, 1, 3) tokens = (-0.5, -2, -1);
    rejected (-4, -3, -2) / (4, 1, 2) = (-1, -3, -1); 2*(0.5, 1, 0) - 1 = (0, 1, -1)
    -> (ln2, ln(1 + e^-1), ln(1 + e)). No reference needed."""
    logps = pairs(
        (-1.0, -2.0, -3.0), (-4.0, -3.0, -2.0), chosen_tokens=(2, 1, 3), rejected_tokens=(4, 1, 2)
    )
    check(
        PAIRWISE["simpo"](logps, beta=2.0, gamma=1.0),
        (LN2, math.log1p(math.exp(-1)), math.log1p(math.e)),
    )


def test_cpo_worked_example():
    """beta 1, alpha 0.5; chosen (-2, -4, -6) over (1, 2, 3) tokens -> NLL 2 each;
    chosen - rejected = (0, ln3, -ln3) -> (ln2 + 1, ln4/3 + 1, ln4 + 1). No reference."""
    chosen = (-2.0, -4.0, -6.0)
    rejected = tuple(c - d for c, d in zip(chosen, (0.0, LN3, -LN3), strict=True))
    logps = pairs(chosen, rejected, chosen_tokens=(1, 2, 3))
    check(PAIRWISE["cpo"](logps, beta=1.0, alpha=0.5), (LN2 + 1, math.log(4 / 3) + 1, LN4 + 1))


def test_orpo_worked_example():
    """lambda 0.5. Average log-probs a: -ln2 (p 1/2, odds 1), -ln4 (p 1/4, odds 1/3),
    -ln(4/3) (p 3/4, odds 3). Rows (a_w, a_l): (-ln2, -ln2), (-ln2, -ln4), (-ln4, -ln4/3):
    log odds ratio (0, ln3, -2ln3); NLL = -a_w = (ln2, ln2, ln4);
    loss = NLL + 0.5 * (ln2, ln(1 + 1/3), ln(1 + 9)); chosen over (2, 1, 3) tokens."""
    chosen = (-2 * LN2, -LN2, -3 * LN4)
    rejected = (-LN2, -LN4, -math.log(4 / 3))
    logps = pairs(chosen, rejected, chosen_tokens=(2, 1, 3))
    expected = (LN2 + 0.5 * LN2, LN2 + 0.5 * math.log(4 / 3), LN4 + 0.5 * math.log(10))
    check(PAIRWISE["orpo"](logps, lambda_=0.5), expected)


def test_orpo_is_finite_at_probability_one():
    logps = pairs((0.0,), (-1.0,), chosen_tokens=(3,))
    loss = PAIRWISE["orpo"](logps)
    assert torch.isfinite(loss).all()


def test_cpl_worked_example():
    """beta 0.5, lambda 0.5, bc 0.1. S_w = 0.5 chosen = (-1, -1, -2);
    rejected (-4, -4-4ln3, -8+4ln3) -> lambda S_l = (-1, -1-ln3, -2+ln3);
    softplus(lambda S_l - S_w) = softplus(0, -ln3, ln3) = (ln2, ln4/3, ln4);
    NLL_w = (2/1, 2/2, 4/4) -> + 0.1 * (2, 1, 1)."""
    logps = pairs((-2.0, -2.0, -4.0), (-4.0, -4 - 4 * LN3, -8 + 4 * LN3), chosen_tokens=(1, 2, 4))
    loss = PAIRWISE["cpl"](logps, beta=0.5, lambda_=0.5, bc_weight=0.1)
    check(loss, (LN2 + 0.2, math.log(4 / 3) + 0.1, LN4 + 0.1))


def test_fdpo_worked_examples():
    """beta 1. forward KL f' ~ 1 - e^-h: h = ln2 -> 1/2; (h_w, h_l) = (0,0), (ln2,0), (0,ln2)
    -> score margins (0, 0.5, -0.5). JS f' = ln2 + log s(h): h=0 -> 0, h=ln3 -> ln(3/2);
    with ln3 in place of ln2 margins (0, ln1.5, -ln1.5) -> (ln2, ln(5/3), ln(5/2)).
    alpha 0.5: f' = 2(1 - e^{-h/2}); h = 2ln2 -> 1; margins (0, 1, -1)."""

    def rows(value):
        return pairs((0.0, value, 0.0), (0.0, 0.0, value), (0.0,) * 3, (0.0,) * 3)

    forward = PAIRWISE["fdpo"](rows(LN2), beta=1.0, divergence="forward_kl")
    check(forward, (LN2, math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))))
    js = PAIRWISE["fdpo"](rows(LN3), beta=1.0, divergence="js")
    check(js, (LN2, math.log(5 / 3), math.log(5 / 2)))
    alpha = PAIRWISE["fdpo"](rows(2 * LN2), beta=1.0, divergence="alpha", alpha_div=0.5)
    check(alpha, (LN2, math.log1p(math.exp(-1)), math.log1p(math.e)))
    with pytest.raises(ValueError):
        f_divergence_score(t(0.0), "hellinger")


def test_fdpo_identities():
    """reverse KL is DPO; alpha -> 1 is reverse KL; alpha = 0 is forward KL."""
    gen = torch.Generator().manual_seed(0)
    logps = PairLogps(
        *(torch.randn(6, generator=gen, dtype=torch.float64) * 3 for _ in range(2)),
        torch.ones(6),
        torch.ones(6),
        *(torch.randn(6, generator=gen, dtype=torch.float64) * 3 for _ in range(2)),
    )
    dpo = PAIRWISE["dpo"](logps, beta=0.3)
    torch.testing.assert_close(PAIRWISE["fdpo"](logps, beta=0.3), dpo)
    torch.testing.assert_close(
        PAIRWISE["fdpo"](logps, beta=0.3, divergence="alpha", alpha_div=1.0), dpo
    )
    torch.testing.assert_close(
        PAIRWISE["fdpo"](logps, beta=0.3, divergence="alpha", alpha_div=1.0 - 1e-9), dpo
    )
    torch.testing.assert_close(
        PAIRWISE["fdpo"](logps, beta=0.3, divergence="alpha", alpha_div=0.0),
        PAIRWISE["fdpo"](logps, beta=0.3, divergence="forward_kl"),
    )


def test_ld_dpo_worked_example():
    """alpha_ld 0.5. Row 1: chosen 4 tokens (-1,-2,-3,-4), rejected 2 tokens (-1,-1) + padding
    (-100, ignored); shared length 2 -> chosen -1-2 + 0.5(-3-4) = -6.5, rejected -2.
    Row 2: masks not left-aligned: chosen tokens at positions 1..3 (-1,-1,-1), rejected
    positions 1..3 (-2,-2,-2): equal lengths -> plain sums -3, -6."""
    chosen_token_logps = t(-1, -2, -3, -4, -100, -1, -1, -1).view(2, 4)
    chosen_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    rejected_token_logps = t(-1, -1, -100, -100, -100, -2, -2, -2).view(2, 4)
    rejected_mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    chosen, rejected = ld_dpo(
        chosen_token_logps, chosen_mask, rejected_token_logps, rejected_mask, 0.5
    )
    check(chosen, (-6.5, -3.0))
    check(rejected, (-2.0, -6.0))


def test_wpo_weights_worked_example():
    """chosen tokens (ln 1/2, ln 1/2) -> w = exp(mean) = 1/2; rejected (ln 1/4, pad) -> 1/4;
    pair weight 1/8. With normalisers log sum p^2 = ln 1/2 at every token: aligned chosen
    ln1 -> 1, rejected ln(1/2) -> 1/2; weight 1/2. Detached."""
    chosen = t(math.log(0.5), math.log(0.5)).view(1, 2).requires_grad_()
    rejected = t(math.log(0.25), -99.0).view(1, 2)
    mask_c, mask_r = torch.tensor([[1, 1]]), torch.tensor([[1, 0]])
    weights = wpo_weights(chosen, mask_c, rejected, mask_r)
    check(weights, (0.125,))
    assert not weights.requires_grad
    norm = torch.full((1, 2), math.log(0.5), dtype=torch.float64)
    check(wpo_weights(chosen, mask_c, rejected, mask_r, norm, norm), (0.5,))


def test_log_sum_squared_probs():
    """logits (0, 0) -> p = (1/2, 1/2), sum p^2 = 1/2; logits (ln3, 0) -> (3/4, 1/4), 10/16."""
    logits = t(0.0, 0.0, LN3, 0.0).view(1, 2, 2)
    check(log_sum_squared_probs(logits).view(-1), (math.log(0.5), math.log(10 / 16)))


def test_combine_losses():
    """0.5 dpo(beta 1) + 2 hinge(beta 0.5) at delta_h = (0, 1, 4):
    dpo (ln2, ln(1 + e^-1), ln(1 + e^-4)); hinge relu(1 - (0, 0.5, 2)) = (1, 0.5, 0)."""
    logps = margin_pairs((0.0, 1.0, 4.0))
    loss = combine_losses(
        logps, {"dpo": 0.5, "hinge": 2.0}, {"dpo": {"beta": 1.0}, "hinge": {"beta": 0.5}}
    )
    expected = (
        0.5 * LN2 + 2.0,
        0.5 * math.log1p(math.exp(-1)) + 1.0,
        0.5 * math.log1p(math.exp(-4)),
    )
    check(loss, expected)
    with pytest.raises(ValueError):
        combine_losses(logps, {"no_such_loss": 1.0})
    with pytest.raises(ValueError):
        combine_losses(logps, {"dpo": 1.0}, {"hinge": {"beta": 0.5}})


def test_reference_based_losses_reject_missing_reference():
    logps = pairs((-1.0,), (-2.0,))
    with pytest.raises(ValueError, match="reference"):
        PAIRWISE["dpo"](logps)
