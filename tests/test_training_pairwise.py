"""End-to-end runs of every registered pairwise loss on a tiny model, and of the family-wide
options (length normalisation, f-divergences, LD-DPO, WPO, loss combinations, BCO's running
shift, MODPO margins, reference-free runs). TR-DPO lives in test_training_pairwise_sync.py."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from run_helpers import assert_resumed_matches, read_metrics, run_interrupted_and_resumed

import alignkit
from alignkit.objectives import PAIRWISE, REFERENCE_FREE
from alignkit.objectives.divergences import DIVERGENCES
from alignkit.testing import synthetic_pairs

COMMON = dict(batch_size=8, max_steps=24, lr=3e-3, warmup_ratio=0.0, progress=False)
# Extra settings per loss: modpo needs objective weights and margins (a zero `margins` column).
EXTRA = {"modpo": {"weights": [1.0, 0.5]}}


def pairs(n: int = 48, seed: int = 1, margins: list[float] | None = None) -> list[dict]:
    rows = synthetic_pairs(n, seed=seed)
    if margins is not None:
        for row in rows:
            row["margins"] = list(margins)
    return rows


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def train(name, tiny_model_dir, output_dir, data=None, **overrides):
    settings = {**COMMON, **EXTRA.get(name, {}), **overrides}
    data = data if data is not None else pairs(margins=[0.0] if name == "modpo" else None)
    result = alignkit.train(name, model=str(tiny_model_dir), data=data, output_dir=output_dir, **settings)
    return result, read_metrics(result.output_dir)


def assert_learned(rows: list[dict]) -> None:
    """The preference was learned: late accuracy >= 0.8 and the reward margin went up."""
    assert mean(rows[-4:], "rewards/accuracies") >= 0.8
    assert mean(rows[-4:], "rewards/margins") > mean(rows[:2], "rewards/margins") + 0.1


CASES = [(name, {}) for name in sorted(PAIRWISE) if name != "discopop"]
CASES += [("fdpo", {"divergence": d}) for d in DIVERGENCES if d != "reverse_kl"]
CASES += [("discopop", {"tau": 0.5})]


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=[f"{n}-{h}" if h else n for n, h in CASES])
def test_every_pairwise_loss_learns_the_preference(tiny_model_dir, tmp_path, name, hparams):
    _, rows = train(name, tiny_model_dir, tmp_path / "run", **hparams)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert_learned(rows)


def test_discopop_at_the_paper_tau_descends_into_its_negative_margin_basin(tiny_model_dir, tmp_path):
    """DiscoPOP with tau = 0.05 has dL/dz > 0 at z = beta * delta_h = 0, where every run starts
    (policy = reference): dL/dz(0) = (1/4 tau)(1 - log 2) - 3/4 = 0.78. So it first moves to a
    local minimum at a small negative margin (the paper's non-convex region); the loss still
    decreases. With tau >= 0.11 the slope at 0 is negative and it learns (the case above)."""
    _, rows = train("discopop", tiny_model_dir, tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/margins"] < 0


def test_reference_free_losses_never_compute_a_reference(tiny_model_dir, tmp_path, monkeypatch):
    from alignkit.training.offline import pairwise_options, reference, tasks

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference-free loss touched the reference")

    monkeypatch.setattr(reference, "compute_reference_logps", forbidden)
    monkeypatch.setattr(tasks, "attach_reference_logps", forbidden)
    monkeypatch.setattr(pairwise_options.LiveReference, "__init__", forbidden)
    for name in sorted(REFERENCE_FREE):
        _, rows = train(name, tiny_model_dir, tmp_path / name, max_steps=4)
        assert len(rows) == 4
    with pytest.raises(ValueError, match="ref_sync"):
        train("simpo", tiny_model_dir, tmp_path / "sync", ref_sync="hard")


def test_length_normalized_dpo_is_sigmoid_norm_and_leaves_simpo_unchanged(tiny_model_dir, tmp_path):
    """-log sigma(beta [(logp_w - ref_w)/|y_w| - (logp_l - ref_l)/|y_l|]) is sigmoid_norm; simpo
    already length-normalises, and the switch hands it token counts of 1, so nothing changes."""
    short = dict(max_steps=6)
    _, normalized = train("dpo", tiny_model_dir, tmp_path / "a", length_normalize=True, **short)
    _, reference = train("sigmoid_norm", tiny_model_dir, tmp_path / "b", **short)
    for a, b in zip(normalized, reference, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    _, simpo_switched = train("simpo", tiny_model_dir, tmp_path / "c", length_normalize=True, **short)
    _, simpo_plain = train("simpo", tiny_model_dir, tmp_path / "d", **short)
    assert [r["loss"] for r in simpo_switched] == pytest.approx([r["loss"] for r in simpo_plain], rel=1e-5)


def test_ld_dpo_with_alpha_one_is_dpo(tiny_model_dir, tmp_path):
    _, ld = train("dpo", tiny_model_dir, tmp_path / "ld", ld_alpha=1.0, max_steps=6)
    _, plain = train("dpo", tiny_model_dir, tmp_path / "plain", max_steps=6)
    for a, b in zip(ld, plain, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def full_logit_token_logps(model, batch) -> torch.Tensor:
    """log p(x_t | x_<t) from the full logits, (2B, T), 0 at t = 0 (independent of the chunked kernel)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])
    return torch.cat([torch.zeros_like(logps[:, :1, 0]), logps[..., 0]], dim=1)


def one_batch(tiny_model_dir, name, rows, **hparams):
    """The task, the tiny model and every pair of `rows` as one collated batch."""
    from alignkit.models import load_model
    from alignkit.training.offline.tasks import make_task
    from alignkit.training.run.config import TrainConfig

    config = TrainConfig(algorithm=name, model=str(tiny_model_dir)).apply_overrides(hparams)
    task = make_task(config)
    model, tokenizer = load_model(str(tiny_model_dir))
    from alignkit.data import load_rows

    examples, _ = task.tokenize(load_rows(rows), tokenizer)
    return task, model, task.collate(examples, tokenizer.pad_token_id)


def scored(batch) -> torch.Tensor:
    mask = batch["response_mask"] & batch["attention_mask"].bool()
    mask[:, 0] = False
    return mask


def test_ld_dpo_reference_cache_holds_length_desensitised_sums(tiny_model_dir):
    """logp_ld = sum of the first min(|y_w|, |y_l|) response tokens + alpha * the rest, checked
    against a plain loop over the full-logit log-probs."""
    rows = [{"prompt": "Write a short review.", "chosen": " was good.", "rejected": " was bad and awful, sad."}]
    task, model, batch = one_batch(tiny_model_dir, "dpo", rows, ld_alpha=0.25)
    ref_chosen, ref_rejected = task.reference_logps(model, batch)
    token_logps, mask = full_logit_token_logps(model, batch), scored(batch)
    shared = int(min(mask[0].sum(), mask[1].sum()))
    expected = []
    for row in range(2):
        values = token_logps[row][mask[row]].tolist()
        expected.append(sum(values[:shared]) + 0.25 * sum(values[shared:]))
    assert shared < int(mask[1].sum())  # the rejected response really has a tail
    torch.testing.assert_close(torch.stack([ref_chosen[0], ref_rejected[0]]), torch.tensor(expected))


def test_wpo_scales_the_step_one_loss_by_the_mean_pair_weight(tiny_model_dir, tmp_path):
    """Step 1 (policy = reference): every DPO loss is log 2, so loss = log 2 * mean_i w_i with
    w = w(y_w) w(y_l), w(y) = exp(mean_t [log p(y_t) - log sum_v p(v)^2]) from the full logits."""
    rows = pairs(8)
    _, metrics = train("dpo", tiny_model_dir, tmp_path / "wpo", data=rows, use_weighting=True, max_steps=2)
    task, model, batch = one_batch(tiny_model_dir, "dpo", rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    log_probs = torch.log_softmax(logits, -1)
    log_sum_sq = torch.logsumexp(2 * log_probs, -1)[:, :-1]  # (2B, T-1) predicting t = 1..
    token = log_probs[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = scored(batch)[:, 1:].float()
    per_sequence = torch.exp(((token - log_sum_sq) * mask).sum(-1) / mask.sum(-1))
    weights = per_sequence[:8] * per_sequence[8:]
    assert metrics[0]["wpo/weight"] == pytest.approx(float(weights.mean()), rel=1e-5)
    assert metrics[0]["loss"] == pytest.approx(math.log(2) * float(weights.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="aot"):
        train("aot", tiny_model_dir, tmp_path / "aot", use_weighting=True)


def test_loss_weights_sum_the_weighted_component_losses(tiny_model_dir, tmp_path):
    """loss = 1.0 * mean DPO + 0.5 * mean_i (-logp(y_w,i) / |y_w,i|); at step 1 DPO is log 2 and
    the SFT term is the chosen NLL of the initial model, computed here from the full logits."""
    rows = pairs(8)
    _, metrics = train("dpo", tiny_model_dir, tmp_path / "mix", data=rows, max_steps=3,
                       loss_weights="{dpo: 1.0, sft: 0.5}")
    for r in metrics:
        assert r["loss"] == pytest.approx(r["loss/dpo"] + 0.5 * r["loss/sft"], rel=1e-5)
    _, model, batch = one_batch(tiny_model_dir, "dpo", rows)
    token_logps, mask = full_logit_token_logps(model, batch), scored(batch)
    nll = -(token_logps * mask)[:8].sum(-1) / mask[:8].sum(-1)
    assert metrics[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[0]["loss/sft"] == pytest.approx(float(nll.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="must include"):
        train("dpo", tiny_model_dir, tmp_path / "bad", loss_weights={"ipo": 1.0})


def test_bco_delta_is_the_running_mean_of_batch_rewards_and_survives_resume(tiny_model_dir, tmp_path):
    """delta_n = mean_{k <= n} x_k with x_k = (mean beta h_w + mean beta h_l) / 2 of batch k
    (TRL's RunningMoments), updated before batch n's loss."""
    common = dict(max_steps=8, save_steps=3, batch_size=4, data=pairs(24, seed=3))
    runs = run_interrupted_and_resumed(partial(train, "bco", tiny_model_dir, **common), tmp_path, at=5)
    full = runs.full
    batch_rewards = [(r["rewards/chosen"] + r["rewards/rejected"]) / 2 for r in full]
    for n, r in enumerate(full, start=1):
        assert r["bco/delta"] == pytest.approx(sum(batch_rewards[:n]) / n, rel=1e-4, abs=1e-6)
    assert full[-1]["bco/delta"] != 0.0
    assert_resumed_matches(full, runs.resumed, ("loss", "bco/delta", "grad_norm", "rewards/margins"), steps=8)


def test_modpo_margins_come_from_a_frozen_reward_model(tiny_model_dir, tmp_path):
    """At step 1 delta_h = 0, so loss = mean_i -log sigma(-(w_1 / w_0) m_i), with m_i the reward
    model's r(x, y_w) - r(x, y_l) (scored here independently); the preference is still learned."""
    from transformers import AutoModelForSequenceClassification

    rm = alignkit.train("rm", model=str(tiny_model_dir), data=pairs(16, seed=5), output_dir=tmp_path / "rm",
                        batch_size=8, max_steps=3, lr=1e-2, progress=False)
    rows = pairs(8)
    _, metrics = train("modpo", tiny_model_dir, tmp_path / "modpo", data=rows, batch_size=8,
                       weights=[1.0, 0.5], margin_reward_models=[str(rm.final_dir)])
    _, _, batch = one_batch(tiny_model_dir, "dpo", rows)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm.final_dir).eval()
    with torch.no_grad():
        logits = reward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scores = logits[:, 0]  # HF pools at the last non-pad token
    margins = scores[:8] - scores[8:]
    expected = -torch.nn.functional.logsigmoid(-0.5 * margins).mean()
    assert margins.abs().max() > 1e-3  # the margins are not trivially zero
    assert metrics[0]["loss"] == pytest.approx(float(expected), rel=1e-4)
    assert_learned(metrics)
    with pytest.raises(ValueError, match="margins"):
        train("modpo", tiny_model_dir, tmp_path / "none", data=pairs(8))
