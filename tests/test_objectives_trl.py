"""Agreement of alignkit's pure losses with TRL's own loss code, values and gradients.

TRL 1.16 keeps the DPO loss variants inline in `DPOTrainer._compute_loss`, so we run that very
method on a trainer built with `object.__new__` (no model, no data) and a stand-in model whose
forward returns given per-token log-probs; reference log-probs go in as "precomputed". That runs
TRL's real code for every `loss_type`, `f_divergence_type`, `use_weighting` (WPO), `ld_alpha`
(LD-DPO) and multi-loss weighting. CPO/SimPO and ORPO have pure methods (`cpo_loss`,
`odds_ratio_loss`) that we call directly. KTO's loss is re-derived in the test from TRL's
`KTOTrainer._compute_loss` formula (the method needs a full KL forward pass).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from alignkit.objectives import PAIRWISE, UNPAIRED, PairLogps, combine_losses, ld_dpo, wpo_weights

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 5, 7  # pairs, response positions


@pytest.fixture(autouse=True)
def _float64_default():
    # TRL builds some constants with torch.tensor(...) in the default dtype; make it float64 so
    # a 1e-6 tolerance measures the formulas, not float32 rounding of those constants.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def make_batch(seed: int, dtype=torch.float64):
    """Random per-token log-probs (2B, T) for [chosen; rejected], ragged masks, reference sums."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=gen)
    lengths[0], lengths[B] = T, 2  # make sure the two sides differ in length somewhere
    positions = torch.arange(T)
    mask = (positions < lengths[:, None]).to(dtype)  # (2B, T), responses left-aligned
    token_logps = -torch.rand(2 * B, T, generator=gen, dtype=dtype) * 1.5 - 0.05
    ref = ((-torch.rand(2 * B, T, generator=gen, dtype=dtype) * 1.5 - 0.05) * mask).sum(-1)
    log_sum_sq = -torch.rand(2 * B, T, generator=gen, dtype=dtype) * 2.0  # WPO normaliser
    return token_logps.requires_grad_(), mask, ref.requires_grad_(), log_sum_sq


def trl_dpo_loss(token_logps, mask, ref, loss_types, **options):
    """Run TRL's `DPOTrainer._compute_loss` on given per-token log-probs; returns the scalar."""
    trainer = object.__new__(dpo_trainer.DPOTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = _Accelerator()
    trainer.aux_loss_enabled = False
    trainer.precompute_ref_logps = True
    trainer.beta = options.get("beta", 0.1)
    trainer.label_smoothing = options.get("label_smoothing", 0.0)
    trainer.loss_types = loss_types
    trainer.loss_weights = options.get("loss_weights", [1.0] * len(loss_types))
    trainer.ld_alpha = options.get("ld_alpha")
    trainer.f_divergence_type = options.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = options.get("f_alpha_divergence_coef", 0.5)
    trainer.use_weighting = options.get("use_weighting", False)
    trainer.args = SimpleNamespace(discopop_tau=options.get("discopop_tau", 0.05))
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    log_sum_sq = options.get("log_sum_sq")

    def model(**kwargs):
        # the fused LM head returns log-prob 0 at label -100 (prompt/padding)
        return SimpleNamespace(
            log_probs=token_logps * mask,
            entropy=torch.zeros_like(mask),
            mean_logits=torch.zeros_like(mask),
            is_top1=torch.zeros_like(mask, dtype=torch.bool),
            log_sum_sq_probs=log_sum_sq,
        )

    # completion_mask has one extra leading (prompt) position: TRL shifts it by one for labels
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask.long()], dim=1)
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    return dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def ours_pair_logps(token_logps, mask, ref, summed=None):
    summed = (token_logps * mask).sum(-1) if summed is None else summed
    tokens = mask.sum(-1)
    return PairLogps(
        chosen=summed[:B],
        rejected=summed[B:],
        chosen_tokens=tokens[:B],
        rejected_tokens=tokens[B:],
        ref_chosen=ref[:B],
        ref_rejected=ref[B:],
    )


def assert_same_value_and_grads(ours, theirs, inputs, atol=1e-6, rtol=1e-6):
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)
    ours_grads = torch.autograd.grad(ours, inputs, allow_unused=True)
    theirs_grads = torch.autograd.grad(theirs, inputs, allow_unused=True)
    for mine, reference in zip(ours_grads, theirs_grads, strict=True):
        mine = torch.zeros_like(reference) if mine is None else mine
        torch.testing.assert_close(mine, reference, atol=atol, rtol=rtol)


# (TRL loss_type, alignkit name, hyper-parameters; TRL reads beta/label_smoothing/discopop_tau)
TRL_DPO_VARIANTS = [
    ("sigmoid", "dpo", {"beta": 0.3}),
    ("hinge", "hinge", {"beta": 0.3}),
    ("ipo", "ipo", {"beta": 0.3}),
    ("exo_pair", "exo", {"beta": 0.3, "label_smoothing": 0.01}),
    ("nca_pair", "nca", {"beta": 0.3}),
    ("robust", "rdpo", {"beta": 0.3, "label_smoothing": 0.2}),
    ("bco_pair", "bco", {"beta": 0.3}),
    ("sppo_hard", "sppo_hard", {"beta": 0.3}),
    ("aot", "aot", {"beta": 0.3, "label_smoothing": 0.1}),
    ("apo_zero", "apo_zero", {"beta": 0.3}),
    ("apo_down", "apo_down", {"beta": 0.3}),
    ("discopop", "discopop", {"beta": 0.3, "tau": 0.2}),
    ("sigmoid_norm", "sigmoid_norm", {"beta": 0.3}),
]


@pytest.mark.parametrize("trl_name, name, hparams", TRL_DPO_VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_trl_dpo_loss_types(trl_name, name, hparams, seed):
    """Batch mean and gradients (w.r.t. per-token log-probs and reference sums) equal TRL's."""
    token_logps, mask, ref, _ = make_batch(seed)
    options = dict(hparams)
    if "tau" in options:
        options["discopop_tau"] = options.pop("tau")
    theirs = trl_dpo_loss(token_logps, mask, ref, [trl_name], **options)
    ours = PAIRWISE[name](ours_pair_logps(token_logps, mask, ref), **hparams).mean()
    assert_same_value_and_grads(ours, theirs, (token_logps, ref))


@pytest.mark.parametrize(
    "divergence, trl_divergence", [("forward_kl", "forward_kl"), ("js", "js_divergence")]
)
def test_fdpo_matches_trl_f_divergence(divergence, trl_divergence):
    token_logps, mask, ref, _ = make_batch(2)
    theirs = trl_dpo_loss(
        token_logps, mask, ref, ["sigmoid"], beta=0.5, f_divergence_type=trl_divergence
    )
    logps = ours_pair_logps(token_logps, mask, ref)
    ours = PAIRWISE["fdpo"](logps, beta=0.5, divergence=divergence).mean()
    assert_same_value_and_grads(ours, theirs, (token_logps, ref))


def test_fdpo_alpha_matches_trl_in_float32():
    """TRL's alpha-divergence clamp table has no float64 entry, so compare in float32 (1e-5)."""
    token_logps, mask, ref, _ = make_batch(3, dtype=torch.float32)
    torch.set_default_dtype(torch.float32)
    theirs = trl_dpo_loss(
        token_logps,
        mask,
        ref,
        ["sigmoid"],
        beta=0.5,
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3,
    )
    logps = ours_pair_logps(token_logps, mask, ref)
    ours = PAIRWISE["fdpo"](logps, beta=0.5, divergence="alpha", alpha_div=0.3).mean()
    assert_same_value_and_grads(ours, theirs, (token_logps, ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trl_name, name, hparams", [TRL_DPO_VARIANTS[0], TRL_DPO_VARIANTS[2]])
def test_wpo_weights_match_trl_use_weighting(trl_name, name, hparams):
    token_logps, mask, ref, log_sum_sq = make_batch(4)
    theirs = trl_dpo_loss(
        token_logps, mask, ref, [trl_name], use_weighting=True, log_sum_sq=log_sum_sq, **hparams
    )
    weights = wpo_weights(
        token_logps[:B], mask[:B], token_logps[B:], mask[B:], log_sum_sq[:B], log_sum_sq[B:]
    )
    assert not weights.requires_grad
    ours = (PAIRWISE[name](ours_pair_logps(token_logps, mask, ref), **hparams) * weights).mean()
    assert_same_value_and_grads(ours, theirs, (token_logps, ref))


def test_ld_dpo_matches_trl_ld_alpha():
    """TRL applies ld_alpha to the policy log-probs (and to the reference ones when it computes
    them itself); with precomputed reference sums only the policy side goes through it."""
    token_logps, mask, ref, _ = make_batch(5)
    # garbage at padded positions must be ignored by ld_dpo (TRL's model zeroes them)
    padded_garbage = token_logps + (1 - mask) * 123.0
    theirs = trl_dpo_loss(token_logps, mask, ref, ["sigmoid"], beta=0.2, ld_alpha=0.4)
    chosen, rejected = ld_dpo(
        padded_garbage[:B], mask[:B], padded_garbage[B:], mask[B:], alpha_ld=0.4
    )
    logps = ours_pair_logps(token_logps, mask, ref, summed=torch.cat([chosen, rejected]))
    ours = PAIRWISE["dpo"](logps, beta=0.2).mean()
    assert_same_value_and_grads(ours, theirs, (token_logps, ref))


def test_combine_losses_matches_trl_multi_loss():
    token_logps, mask, ref, _ = make_batch(6)
    theirs = trl_dpo_loss(
        token_logps,
        mask,
        ref,
        ["sigmoid", "bco_pair", "hinge"],
        beta=0.3,
        loss_weights=[0.8, 0.2, 0.5],
    )
    logps = ours_pair_logps(token_logps, mask, ref)
    weights = {"dpo": 0.8, "bco": 0.2, "hinge": 0.5}
    ours = combine_losses(logps, weights, {name: {"beta": 0.3} for name in weights}).mean()
    assert_same_value_and_grads(ours, theirs, (token_logps, ref))


# --- CPO / SimPO / ORPO: TRL's pure loss methods --------------------------------------------


def _random_pairs(seed):
    gen = torch.Generator().manual_seed(seed)
    chosen = (-torch.rand(B, generator=gen) * 20 - 0.5).requires_grad_()
    rejected = (-torch.rand(B, generator=gen) * 20 - 0.5).requires_grad_()
    chosen_tokens = torch.randint(1, 30, (B,), generator=gen).double()
    rejected_tokens = torch.randint(1, 30, (B,), generator=gen).double()
    return chosen, rejected, chosen_tokens, rejected_tokens


def _cpo_trainer(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    cpo_module = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    trainer = object.__new__(cpo_module.CPOTrainer)
    trainer.alpha = 0.0  # AlphaPO transform off
    trainer.loss_type, trainer.beta, trainer.label_smoothing = loss_type, beta, label_smoothing
    trainer.simpo_gamma = simpo_gamma
    trainer.accelerator = _Accelerator()
    return trainer


def test_simpo_matches_trl_cpo_loss_simpo():
    """TRL feeds length-averaged log-probs (`average_log_prob=True` for simpo) to cpo_loss."""
    chosen, rejected, chosen_tokens, rejected_tokens = _random_pairs(7)
    trainer = _cpo_trainer("simpo", beta=2.0, label_smoothing=0.1, simpo_gamma=0.7)
    theirs, _, _ = trainer.cpo_loss(chosen / chosen_tokens, rejected / rejected_tokens)
    logps = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
    ours = PAIRWISE["simpo"](logps, beta=2.0, gamma=0.7, label_smoothing=0.1)
    assert_same_value_and_grads(ours.sum(), theirs.sum(), (chosen, rejected))
    torch.testing.assert_close(ours, theirs)


def test_cpo_preference_term_matches_trl_cpo_loss_sigmoid():
    """TRL adds cpo_alpha * (batch token-mean NLL) outside cpo_loss; with alpha = 0 we compare
    the preference term exactly (our NLL is per-sequence, see `cpo`'s docstring)."""
    chosen, rejected, chosen_tokens, rejected_tokens = _random_pairs(8)
    trainer = _cpo_trainer("sigmoid", beta=0.2, label_smoothing=0.15)
    theirs, _, _ = trainer.cpo_loss(chosen, rejected)
    logps = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
    ours = PAIRWISE["cpo"](logps, beta=0.2, alpha=0.0, label_smoothing=0.15)
    assert_same_value_and_grads(ours.sum(), theirs.sum(), (chosen, rejected))


def test_cdpo_matches_trl_smoothed_sigmoid():
    """TRL 1.16's DPO `sigmoid` ignores label smoothing; its CPO `sigmoid` keeps the cDPO form
    -(1-eps) log sigma(beta z) - eps log sigma(-beta z) on z = its two inputs' difference, so
    feeding it the log-ratios h_w, h_l gives cDPO."""
    chosen, rejected, chosen_tokens, rejected_tokens = _random_pairs(9)
    ref_chosen, ref_rejected, _, _ = _random_pairs(10)
    trainer = _cpo_trainer("sigmoid", beta=0.3, label_smoothing=0.2)
    theirs, _, _ = trainer.cpo_loss(chosen - ref_chosen, rejected - ref_rejected)
    logps = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected)
    ours = PAIRWISE["cdpo"](logps, beta=0.3, label_smoothing=0.2)
    assert_same_value_and_grads(
        ours.sum(), theirs.sum(), (chosen, rejected, ref_chosen, ref_rejected)
    )


def test_orpo_odds_term_matches_trl_odds_ratio_loss():
    """TRL: loss = nll - mean(beta * logsigmoid(log_odds)); `odds_ratio_loss` returns the
    second part (computed in float32, hence 1e-5) from length-averaged log-probs."""
    orpo_module = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    trainer = object.__new__(orpo_module.ORPOTrainer)
    trainer.beta, trainer.accelerator = 0.25, _Accelerator()
    chosen, rejected, chosen_tokens, rejected_tokens = _random_pairs(11)
    chosen_tokens = chosen_tokens.clamp(min=4)  # averages on both sides of -log 2
    theirs, _, _, _, _ = trainer.odds_ratio_loss(chosen / chosen_tokens, rejected / rejected_tokens)
    logps = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
    nll = -chosen / chosen_tokens
    ours = PAIRWISE["orpo"](logps, lambda_=0.25) - nll
    assert_same_value_and_grads(
        ours.sum(), -theirs.double().sum(), (chosen, rejected), atol=1e-5, rtol=1e-5
    )


def test_kto_matches_trl_formula():
    """Re-derived from TRL 1.16 `KTOTrainer._compute_loss` (loss_type "kto"):
    chosen 1 - sigmoid(beta (h - kl)), rejected 1 - sigmoid(beta (kl - h)), scaled by the
    desirable/undesirable weights and concatenated [chosen; rejected]; kl clamped >= 0."""
    gen = torch.Generator().manual_seed(12)
    logps = (-torch.rand(8, generator=gen) * 30).requires_grad_()
    ref_logps = -torch.rand(8, generator=gen) * 30
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    kl = torch.tensor(0.7)
    beta, desirable_weight, undesirable_weight = 0.2, 1.3, 0.6
    log_ratio = logps - ref_logps
    theirs = torch.cat(
        (
            desirable_weight * (1 - F.sigmoid(beta * (log_ratio[labels] - kl))),
            undesirable_weight * (1 - F.sigmoid(beta * (kl - log_ratio[~labels]))),
        )
    )
    ours = UNPAIRED["kto"](
        logps,
        ref_logps,
        labels,
        kl,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    ours_reordered = torch.cat((ours[labels], ours[~labels]))
    assert_same_value_and_grads(ours_reordered.sum(), theirs.sum(), (logps,))
    torch.testing.assert_close(ours_reordered, theirs)
