"""T-REG: the loss against hand-computed numbers and its derivation, the contrastive token
rewards against a plain teacher-forced forward, the cache, and end-to-end runs."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from run_helpers import (
    PAIRWISE_DETERMINISTIC,
    assert_resumed_matches,
    read_metrics,
    run_interrupted_and_resumed,
)

import alignkit
from alignkit.objectives import PAIRWISE, PairLogps
from alignkit.objectives.treg import contrastive_token_rewards, treg
from alignkit.testing import synthetic_pairs
from alignkit.training.offline.treg import TRegTask, contrast_table, response_aligned, wrap_prompt

COMMON = dict(batch_size=8, max_steps=24, lr=3e-3, warmup_ratio=0.0, progress=False, accept_unverified=True)


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def pair(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens=2.0, rejected_tokens=1.0, grad=False):
    t = lambda v: torch.tensor([v], dtype=torch.float64, requires_grad=grad)  # noqa: E731
    return PairLogps(t(chosen), t(rejected), t(chosen_tokens), t(rejected_tokens), t(ref_chosen), t(ref_rejected))


def test_token_reward_worked_example():
    """p(y_t | x_better) = 0.6, p(y_t | x_worse) = 0.2: sigma(log 3) - 1/2 = 3/4 - 1/2 = 0.25;
    the reverse gives -0.25; equal log-probs give 0."""
    better = torch.log(torch.tensor([0.6, 0.2, 0.5]))
    worse = torch.log(torch.tensor([0.2, 0.6, 0.5]))
    assert torch.allclose(contrastive_token_rewards(better, worse), torch.tensor([0.25, -0.25, 0.0]), atol=1e-7)


def test_treg_worked_example():
    """beta 0.1, alpha 0.5. logp_w = -10, logp_l = -12, both references -11:
    delta_h = 1 - (-1) = 2, m = 0.2, L_DPO = log(1 + e^-0.2) = 0.5981389, w = sigma(-0.2) = 0.4501660.
    Chosen tokens: r = (0.25, -0.1), log pi = (-4, -6): sum r log pi = -1 + 0.6 = -0.4,
    L_REG(y_w) = -0.1 * -0.4 = 0.04. Rejected token: r = -0.3, log pi = -12: sum = 3.6,
    L_REG(y_l) = -0.36. L = 0.5981389 + 0.5 * 0.4501660 * (0.04 - 0.36) = 0.5261123."""
    logps = pair(-10.0, -12.0, -11.0, -11.0)
    weighted_w = torch.tensor([0.25 * -4 + -0.1 * -6], dtype=torch.float64)
    weighted_l = torch.tensor([-0.3 * -12], dtype=torch.float64)
    loss = treg(logps, weighted_w, weighted_l, beta=0.1, alpha=0.5)
    expected = math.log1p(math.exp(-0.2)) + 0.5 * (1 / (1 + math.exp(0.2))) * (0.04 - 0.36)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.5261123, abs=1e-7)


def test_zero_token_rewards_give_the_base_loss_exactly():
    torch.manual_seed(0)
    logps = PairLogps(*(torch.randn(6, dtype=torch.float64) for _ in range(2)),
                      torch.randint(1, 9, (6,)).double(), torch.randint(1, 9, (6,)).double(),
                      *(torch.randn(6, dtype=torch.float64) for _ in range(2)))
    zero = torch.zeros(6, dtype=torch.float64)
    assert torch.equal(treg(logps, zero, zero, beta=0.3), PAIRWISE["dpo"](logps, beta=0.3))
    simpo = treg(logps, zero, zero, beta=2.0, base="simpo", gamma=0.7)
    assert torch.allclose(simpo, PAIRWISE["simpo"](logps, beta=2.0, gamma=0.7), atol=1e-12)


@pytest.mark.parametrize("base", ["dpo", "simpo"])
def test_gradient_is_the_base_gradient_plus_the_token_weighted_lm_gradient(base):
    """Per-token log-probs l_t as leaves (float64). d L / d l_t must be
    dL_base/dl_t - alpha * w * c * r_t, with w = sigma(-m) held constant (detached) and c = beta
    (DPO) or beta/|y| (SimPO): the gradient of maximising sum_t r_t c log(pi/pi_ref)(y_t), where
    pi_ref drops out."""
    torch.manual_seed(1)
    beta, alpha, gamma = (0.1, 0.7, 0.0) if base == "dpo" else (2.0, 0.7, 0.5)
    tokens_w = torch.randn(5, dtype=torch.float64).sub(2).requires_grad_()
    tokens_l = torch.randn(3, dtype=torch.float64).sub(2).requires_grad_()
    r_w, r_l = torch.rand(5, dtype=torch.float64) - 0.5, torch.rand(3, dtype=torch.float64) - 0.5
    ref = torch.tensor([-9.0], dtype=torch.float64), torch.tensor([-7.5], dtype=torch.float64)

    def logps_of(lw, ll):
        return PairLogps(lw.sum().reshape(1), ll.sum().reshape(1), torch.tensor([5.0], dtype=torch.float64),
                         torch.tensor([3.0], dtype=torch.float64), ref[0], ref[1])

    loss = treg(logps_of(tokens_w, tokens_l), (r_w * tokens_w).sum().reshape(1), (r_l * tokens_l).sum().reshape(1),
                beta=beta, alpha=alpha, base=base, gamma=gamma).sum()
    grad_w, grad_l = torch.autograd.grad(loss, (tokens_w, tokens_l))

    base_loss = (PAIRWISE["dpo"](logps_of(tokens_w, tokens_l), beta=beta) if base == "dpo"
                 else PAIRWISE["simpo"](logps_of(tokens_w, tokens_l), beta=beta, gamma=gamma)).sum()
    base_w, base_l = torch.autograd.grad(base_loss, (tokens_w, tokens_l))
    with torch.no_grad():
        lw, ll = tokens_w.sum(), tokens_l.sum()
        margin = beta * ((lw - ref[0]) - (ll - ref[1])) if base == "dpo" else beta * (lw / 5 - ll / 3) - gamma
        weight = torch.sigmoid(-margin)
        c_w, c_l = (beta, beta) if base == "dpo" else (beta / 5, beta / 3)
    assert torch.allclose(grad_w, base_w - alpha * weight * c_w * r_w, atol=1e-12)
    assert torch.allclose(grad_l, base_l - alpha * weight * c_l * r_l, atol=1e-12)


def test_wrap_prompt_strings_and_conversations():
    assert wrap_prompt("Hi", "{prompt} -- be good") == "Hi -- be good"
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    wrapped = wrap_prompt(conversation, "[{prompt}]")
    assert [m["content"] for m in wrapped] == ["S", "Q1", "A1", "[Q2]"]
    assert conversation[3]["content"] == "Q2"  # the row itself is untouched


def test_contrast_table_names_the_row_it_cannot_wrap():
    from alignkit.data import RowTable

    table = RowTable([{"prompt": "ok", "chosen": "a", "rejected": "b"},
                      {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}],
                     [("pairs.jsonl", 1), ("pairs.jsonl", 2)])
    with pytest.raises(ValueError, match=r"pairs\.jsonl.*2.*no user message"):
        contrast_table(table, "{prompt}!")


def test_treg_needs_an_explicit_acknowledgement(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="accept_unverified=true"):
        alignkit.train("treg", model=str(tiny_model_dir), data=synthetic_pairs(8), output_dir=tmp_path,
                       **{k: v for k, v in COMMON.items() if k != "accept_unverified"})


def test_templates_are_checked():
    from alignkit.training.run.config import TrainConfig

    with pytest.raises(ValueError, match=r"must contain \{prompt\}"):
        TRegTask(TrainConfig(algorithm="treg", hparams={"accept_unverified": True, "better_template": "no slot"}))
    with pytest.raises(ValueError, match="identical"):
        TRegTask(TrainConfig(algorithm="treg", hparams={"accept_unverified": True, "better_template": "{prompt}",
                                                        "worse_template": "{prompt}"}))


def test_token_rewards_equal_a_plain_forward_after_each_wrapped_prompt(tiny_model_dir, tmp_path):
    """The cached r_t of every response token equals sigma(log p_better - log p_worse) - 1/2 from
    one full-logits forward of [wrapped prompt ids + response ids], token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data import RowTable, tokenize_pairwise
    from alignkit.training.offline.tasks import tokenize_options
    from alignkit.training.run.config import TrainConfig

    rows = synthetic_pairs(5, seed=3)
    config = TrainConfig(algorithm="treg", model=str(tiny_model_dir), batch_size=2, progress=False,
                         hparams={"accept_unverified": True})
    task = TRegTask(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    table = RowTable(rows)
    examples, _ = task.tokenize(table, tokenizer)
    task.prepare(model, tokenizer, {"train": (table, examples), "eval": (None, [])}, tmp_path)

    def response_logps(prompt_ids, response_ids):
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        return logp[len(prompt_ids) - 1:]

    for side_rows in [contrast_table(table, task.prompts["better"]), contrast_table(table, task.prompts["worse"])]:
        assert side_rows.rows[0]["prompt"] != rows[0]["prompt"]
    better, _ = tokenize_pairwise(contrast_table(table, task.prompts["better"]), tokenizer, **tokenize_options(config))
    worse, _ = tokenize_pairwise(contrast_table(table, task.prompts["worse"]), tokenizer, **tokenize_options(config))
    for example, b, w in zip(examples, better, worse, strict=True):
        for key, response in (("chosen_token_rewards", example.chosen_ids), ("rejected_token_rewards", example.rejected_ids)):
            expected = contrastive_token_rewards(response_logps(b.prompt_ids, response), response_logps(w.prompt_ids, response))
            assert example.extras[key].shape == (len(response),)
            assert torch.allclose(example.extras[key], expected, atol=1e-5)
        assert "better_prompt_ids" not in example.extras
    assert "ref_chosen" in examples[0].extras  # DPO's reference sums too
    batch = task.collate(examples[:2], tokenizer.pad_token_id)
    mask = batch["response_mask"].bool()
    assert torch.equal(batch["token_rewards"][0][mask[0]], examples[0].extras["chosen_token_rewards"])
    assert torch.equal(batch["token_rewards"][3][mask[3]], examples[1].extras["rejected_token_rewards"])
    assert (batch["token_rewards"][~mask] == 0).all()


def test_response_aligned_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="lengths"):
        response_aligned([torch.ones(2)], torch.tensor([[0, 1, 1, 1]]))


@pytest.mark.parametrize(("base", "settings"), [("dpo", {}), ("simpo", {"beta": 2.0, "lr": 1e-3})])
def test_treg_learns_the_preference(tiny_model_dir, tmp_path, base, settings):
    result = alignkit.train("treg", model=str(tiny_model_dir), data=synthetic_pairs(48, seed=1),
                            output_dir=tmp_path / "run", **{**COMMON, "base": base, **settings})
    rows = read_metrics(result.output_dir)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert mean(rows[-4:], "rewards/accuracies") >= 0.8
    assert mean(rows[-4:], "rewards/margins") > mean(rows[:2], "rewards/margins") + 0.1
    assert (result.output_dir / "treg_token_rewards.safetensors").exists()


def test_token_rewards_steer_the_token_log_probs(tiny_model_dir, tmp_path, monkeypatch):
    """Planted token rewards that DPO's own gradient does not follow: +0.4 on every token of
    BOTH responses. DPO pushes chosen up and rejected down; the regulariser (alpha = 2) adds a
    push up on both, so both log-probs end higher than in the same run without it (alpha = 0),
    while the preference is still learned."""

    def planted(self, model, batch):
        lengths = batch["response_mask"].bool().sum(-1).tolist()
        half = len(lengths) // 2
        return {"chosen_token_rewards": [torch.full((n,), 0.4) for n in lengths[:half]],
                "rejected_token_rewards": [torch.full((n,), 0.4) for n in lengths[half:]]}

    monkeypatch.setattr(TRegTask, "reference_values", planted)
    final = {}
    for alpha in (0.0, 2.0):
        result = alignkit.train("treg", model=str(tiny_model_dir), data=synthetic_pairs(48, seed=1),
                                output_dir=tmp_path / f"alpha{alpha}", alpha=alpha, **COMMON)
        final[alpha] = read_metrics(result.output_dir)[-4:]
    assert mean(final[2.0], "token_rewards/rejected") == pytest.approx(0.4, abs=1e-6)
    assert mean(final[2.0], "logps/chosen") > mean(final[0.0], "logps/chosen") + 2.0
    assert mean(final[2.0], "logps/rejected") > mean(final[0.0], "logps/rejected") + 2.0
    assert mean(final[2.0], "rewards/accuracies") >= 0.8


def test_token_rewards_are_cached_and_recomputed_when_the_templates_change(tiny_model_dir, tmp_path, monkeypatch):
    data = synthetic_pairs(16, seed=2)
    settings = {**COMMON, "max_steps": 2}
    alignkit.train("treg", model=str(tiny_model_dir), data=data, output_dir=tmp_path, **settings)
    calls = []
    original = TRegTask.reference_values

    def counting(self, model, batch):
        calls.append(1)
        return original(self, model, batch)

    monkeypatch.setattr(TRegTask, "reference_values", counting)
    alignkit.train("treg", model=str(tiny_model_dir), data=data, output_dir=tmp_path, overwrite=True, **settings)
    assert not calls  # same data, model and templates: read from the cache
    alignkit.train("treg", model=str(tiny_model_dir), data=data, output_dir=tmp_path, overwrite=True,
                   better_template="{prompt} Please answer well.", **settings)
    assert calls


# ---------------------------------------------------------------- properties


@given(seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 50.0, 500.0]), base=st.sampled_from(["dpo", "simpo"]))
@settings(max_examples=40, deadline=None)
def test_finite_loss_and_gradients_on_random_inputs(seed, scale, base):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 30, (2, 4), generator=gen)
    per_token = [-torch.rand(int(n), generator=gen, dtype=torch.float64).mul(scale).requires_grad_() for n in tokens.flatten()]
    rewards = [torch.rand(len(t), generator=gen, dtype=torch.float64) - 0.5 for t in per_token]
    sums = torch.stack([t.sum() for t in per_token]).view(2, 4)
    weighted = torch.stack([(r * t).sum() for r, t in zip(rewards, per_token, strict=True)]).view(2, 4)
    refs = -torch.rand(2, 4, generator=gen, dtype=torch.float64) * scale
    logps = PairLogps(sums[0], sums[1], tokens[0].double(), tokens[1].double(), refs[0], refs[1])
    loss = treg(logps, weighted[0], weighted[1], beta=0.1 if base == "dpo" else 2.0, alpha=0.5, base=base)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    grads = torch.autograd.grad(loss.sum(), per_token)
    assert all(torch.isfinite(g).all() for g in grads)


def test_log2_plus_half_the_regulariser_when_policy_equals_reference():
    """delta_h = 0: L_DPO = log 2 and w = sigma(0) = 1/2, so L = log 2 + alpha/2 (L_REG_w + L_REG_l)."""
    logps = pair(-7.0, -3.0, -7.0, -3.0)
    zero = torch.zeros(1, dtype=torch.float64)
    assert treg(logps, zero, zero).item() == pytest.approx(math.log(2), abs=1e-12)
    weighted_w, weighted_l = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([1.5], dtype=torch.float64)
    expected = math.log(2) + 0.3 / 2 * (-0.1 * -2.0 + -0.1 * 1.5)
    assert treg(logps, weighted_w, weighted_l, alpha=0.3).item() == pytest.approx(expected, abs=1e-12)


def test_padding_and_rewards_off_the_response_are_ignored(tiny_model_dir):
    """Extra padding columns, with garbage token rewards written at padded and prompt positions,
    leave the task's loss unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data import RowTable
    from alignkit.training.run.config import TrainConfig

    task = TRegTask(TrainConfig(algorithm="treg", hparams={"accept_unverified": True}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples, _ = task.tokenize(RowTable(synthetic_pairs(3, seed=5)), tokenizer)
    gen = torch.Generator().manual_seed(0)
    for ex in examples:
        ex.extras.update(ref_chosen=-30.0, ref_rejected=-31.0,
                         chosen_token_rewards=torch.rand(len(ex.chosen_ids), generator=gen) - 0.5,
                         rejected_token_rewards=torch.rand(len(ex.rejected_ids), generator=gen) - 0.5)
    batch = task.collate(examples, tokenizer.pad_token_id)
    loss, _ = task.loss(model, batch)
    extra = 5
    padded = {k: v for k, v in batch.items()}
    for key, fill in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("response_mask", False)):
        padded[key] = torch.cat([batch[key], torch.full((batch[key].shape[0], extra), fill, dtype=batch[key].dtype)], 1)
    garbage = torch.rand(batch["token_rewards"].shape[0], batch["token_rewards"].shape[1] + extra, generator=gen) - 0.5
    response = padded["response_mask"].bool() & padded["attention_mask"].bool()
    padded["token_rewards"] = torch.where(response, torch.cat([batch["token_rewards"], torch.zeros(garbage.shape[0], extra)], 1), garbage)
    padded_loss, _ = task.loss(model, padded)
    torch.testing.assert_close(padded_loss, loss, atol=1e-6, rtol=1e-6)


def test_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Token rewards and reference sums come back from the run's caches; the resumed run's
    metrics equal the uninterrupted run's, step for step."""
    common = dict(model=str(tiny_model_dir), data=synthetic_pairs(24, seed=3),
                  **{**COMMON, "batch_size": 4, "max_steps": 8, "lr": 5e-3, "save_steps": 3})
    runs = run_interrupted_and_resumed(partial(alignkit.train, "treg", **common), tmp_path, at=5)
    keys = (*PAIRWISE_DETERMINISTIC, "loss/regulariser", "token_rewards/chosen")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=8)
