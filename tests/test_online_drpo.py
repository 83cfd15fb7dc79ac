"""drpo (DR-PO's dataset reset): the prefix-length draw, the per-row seeded prefixes, the engine's
teacher-forced roll-in, the policy-gradient mask and GAE's reward whitening by worked examples;
the offline-response column and its errors; on a tiny model it learns count_e (its own samples,
without roll-in, measured on held-out prompts); exact resume; bad settings refused in one line."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
    teacher_forced_logps,
)
from test_online import PROMPTS, count_e, one_thread  # noqa: F401  (one_thread: the module's autouse fixture)

import alignkit
from alignkit.data import RowTable
from alignkit.models import load_model
from alignkit.rollout import HFEngine, SamplingParams
from alignkit.rollout.sampling import counter_uniform
from alignkit.training.online.presets import OnlineSettings
from alignkit.training.online.reset import (
    choose_reset_column,
    load_reset_responses,
    offline_responses,
    prefix_lengths,
    rollin_metrics,
    rollin_prefixes,
)
from alignkit.training.online.roles import SequenceBatch
from alignkit.training.online.sampling import reset_seed, step_seed
from alignkit.training.online.server_rollout import ServerRollout
from alignkit.training.online.steps import compute_advantages, policy_gradient_update

E_RICH = "e e e e e e e e e e"  # 19 tokens of the tiny tokenizer: e, space, e, ...
RESET_ROWS = [{"prompt": p, "chosen": E_RICH, "rejected": "a b c"} for p in PROMPTS * 4]


def run(algorithm, model_dir, output_dir, steps=40, data=RESET_ROWS, **overrides):
    """test_online's tiny run (count_e, batch 4 x 4 samples, 8 new tokens) on `data`."""
    settings = dict(batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                    progress=False, max_new_tokens=8, group_size=4)
    settings.update(overrides)
    return alignkit.train(algorithm, model=str(model_dir), data=data, output_dir=output_dir, reward=count_e,
                          **settings)


def test_prefix_lengths_worked_example():
    """k = 1 + floor(u (L - 1)) if v < p and L >= 2, else 0.
    L = 5, u = 0.6: 1 + floor(2.4) = 3;  L = 1: no reset;  L = 2, u = 0.999: 1 + floor(0.999) = 1.
    p = 0.5: rows with v = 0.7 and 0.99 are not reset."""
    lengths = torch.tensor([5, 1, 5, 2])
    v = torch.tensor([0.1, 0.1, 0.7, 0.99], dtype=torch.float64)
    u = torch.tensor([0.6, 0.5, 0.6, 0.999], dtype=torch.float64)
    assert prefix_lengths(lengths, v, u, 1.0).tolist() == [3, 0, 3, 1]
    assert prefix_lengths(lengths, v, u, 0.5).tolist() == [3, 0, 0, 0]
    assert prefix_lengths(lengths, v, u, 0.0).tolist() == [0, 0, 0, 0]


def test_prefix_lengths_are_uniform_on_one_to_l_minus_one():
    """A grid of 400 u's in [0, 1) over L = 5 gives k = 1, 2, 3, 4 exactly 100 times each, never
    0 or L (the policy always generates the last token)."""
    u = (torch.arange(400, dtype=torch.float64) + 0.5) / 400
    ks = prefix_lengths(torch.full((400,), 5), torch.zeros(400, dtype=torch.float64), u, 1.0)
    assert torch.bincount(ks, minlength=6).tolist() == [0, 100, 100, 100, 100, 0]


def test_rollin_prefixes_are_drawn_per_row_from_the_seeded_noise():
    """Prompt 0 has a 4-token response, prompt 1 none; G = 2: rows 0 and 1 take prefixes of
    lengths 1 + floor(u_r x 3) with u_r = counter_uniform(seed, r, 1), rows 2 and 3 none; the
    same seed gives the same prefixes, another step another draw."""
    responses = [[10, 11, 12, 13], None]
    seed = reset_seed(42, step=3)
    prefixes = rollin_prefixes(responses, 2, 1.0, seed)
    u = counter_uniform(seed, torch.tensor([0, 1]), 1)
    assert [len(p) for p in prefixes[:2]] == [1 + math.floor(float(x) * 3) for x in u]
    assert prefixes[0] == [10, 11, 12, 13][: len(prefixes[0])] and prefixes[2:] == [[], []]
    assert rollin_prefixes(responses, 2, 1.0, seed) == prefixes
    assert reset_seed(42, 3) != reset_seed(42, 4) and reset_seed(42, 3) != reset_seed(42, 3, 1)
    assert reset_seed(42, 3) != step_seed(42, 3)  # apart from the engine's sampling noise
    draws = {tuple(len(p) for p in rollin_prefixes([[1, 2, 3, 4]] * 8, 1, 1.0, reset_seed(0, s))) for s in range(5)}
    assert len(draws) == 5


def test_engine_rolls_in_the_prefix_and_scores_it_under_the_policy(tiny_model_dir):
    """Row 0 is forced to [eos, 70, 71] (a forced eos does not end it), row 1 rolls in nothing and
    draws exactly what it draws without prefixes; the rolled-in tokens' log-probs are the
    policy's teacher-forced ones, and rollin_mask marks them."""
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,))
    prompts = [[5, 6, 7]]
    sampling = SamplingParams(max_new_tokens=6, seed=11)
    forced = [tokenizer.eos_token_id, 70, 71]
    rolled = engine.generate(prompts, 2, sampling, prefixes=[forced, []])
    plain = engine.generate(prompts, 2, sampling)
    assert rolled.response_ids[0, :3].tolist() == forced and rolled.lengths[0] > 3
    assert rolled.rollin_mask[0, :4].tolist() == [True, True, True, False]
    assert not rolled.rollin_mask[1].any() and plain.rollin_mask is None
    n = int(rolled.lengths[1])
    assert rolled.response_ids[1, :n].tolist() == plain.response_ids[1, : int(plain.lengths[1])].tolist()
    torch.testing.assert_close(rolled.response_logprobs[rolled.response_mask],
                               teacher_forced_logps(model, rolled, tokenizer.pad_token_id), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shorter than max_new_tokens"):
        engine.generate(prompts, 1, sampling, prefixes=[[1] * 6])


class _Logits(torch.nn.Module):
    """A stand-in policy whose log-probs and values (None: no critic) are free parameters, (1, 3)."""

    def __init__(self, critic: bool = True) -> None:
        super().__init__()
        self.logp = torch.nn.Parameter(torch.tensor([[-1.0, -2.0, -0.5]]))
        self.value = torch.nn.Parameter(torch.zeros(1, 3)) if critic else None

    def forward(self, batch, with_entropy=False):
        return self.logp, torch.zeros(1, 3), self.value

    def gradient_sync(self, enabled):
        import contextlib

        return contextlib.nullcontext()


def _one_row_batch() -> SequenceBatch:
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    sequence = torch.tensor([[False, False, True, True, True]])
    return SequenceBatch(ids, torch.ones_like(ids), sequence, torch.ones(1, 3, dtype=torch.bool))


def test_rolled_in_tokens_get_no_policy_gradient_but_a_value_loss():
    """One sample of 3 tokens, the first rolled in; A = [5, 1, 3], on-policy (ratio 1), token_mean:
    policy loss = -(1 + 3) / 2 = -2 (not -(5 + 1 + 3) / 3), d/dlogp = [0, -1/2, -3/2].
    Value loss over all 3 tokens: 0.5 x mean((0 - 1)^2) = 0.5, d/dV = (V - G) / 3 = -1/3 each."""
    policy, batch, s = _Logits(), _one_row_batch(), OnlineSettings(critic="shared", vf_coef=1.0, log_entropy=False)
    advantages, returns = torch.tensor([[5.0, 1.0, 3.0]]), torch.ones(1, 3)
    rollin = torch.tensor([[True, False, False]])
    metrics = policy_gradient_update(policy, batch, torch.tensor([0]), s, None, None, advantages, returns,
                                     torch.zeros(1, 3), True, 0.0, True, rollin_mask=rollin)
    assert metrics["policy_loss"] == pytest.approx(-2.0) and metrics["value_loss"] == pytest.approx(0.5)
    torch.testing.assert_close(policy.logp.grad, torch.tensor([[0.0, -0.5, -1.5]]))
    torch.testing.assert_close(policy.value.grad, torch.full((1, 3), -1.0 / 3))
    plain = _Logits()
    policy_gradient_update(plain, batch, torch.tensor([0]), s, None, None, advantages, returns, torch.zeros(1, 3),
                           True, 0.0, True)
    torch.testing.assert_close(plain.logp.grad, torch.tensor([[-5.0, -1.0, -3.0]]) / 3)


def test_a_kl_in_the_loss_still_covers_the_rolled_in_tokens():
    """kl_in=loss, beta 1, k1 = logp - ref = [0.5, 0, 0.5], A = 0: loss = (0.5 + 0 + 0.5) / 3 over
    all 3 tokens, the rolled-in one included; d/dlogp = 1/3 on each."""
    policy, batch = _Logits(critic=False), _one_row_batch()
    s = OnlineSettings(kl_in="loss", beta=1.0, log_entropy=False)
    ref = torch.tensor([[-1.5, -2.0, -1.0]])
    metrics = policy_gradient_update(policy, batch, torch.tensor([0]), s, None, ref, torch.zeros(1, 3), None, None,
                                     True, 1.0, True, rollin_mask=torch.tensor([[True, False, False]]))
    assert metrics["policy_loss"] == pytest.approx(1.0 / 3)
    torch.testing.assert_close(policy.logp.grad, torch.full((1, 3), 1.0 / 3))


def test_whitened_rewards_worked_example():
    """Token rewards [0, 0, 2] (R = 2 on the last token): mean 2/3, std sqrt(8/9); mean kept:
    r' = (r - 2/3) / sqrt(8/9) + 2/3 = [-0.0404, -0.0404, 2.0809]; zero values, gamma = lam = 1:
    returns are the sums from t on, [2.0, 2.0404, 2.0809]."""
    s = OnlineSettings(advantage="gae", critic="separate", whiten_rewards=True, lam=1.0)
    mask = torch.ones(1, 3, dtype=torch.bool)
    _, returns = compute_advantages(s, torch.tensor([2.0]), torch.zeros(1, dtype=torch.long), mask, None,
                                    torch.zeros(1, 3), None)
    whitened = (torch.tensor([0.0, 0.0, 2.0]) - 2 / 3) / math.sqrt(8 / 9) + 2 / 3
    torch.testing.assert_close(returns[0], whitened.flip(0).cumsum(0).flip(0))
    assert returns[0].tolist() == pytest.approx([2.0, 2.0404, 2.0809], abs=1e-4)


def test_rollin_metrics():
    """Rows with 2, 0 and 3 rolled-in tokens: 2 of 3 reset, 5 / 3 tokens per sample."""
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert rollin_metrics(mask) == pytest.approx({"drpo/reset_fraction": 2 / 3, "drpo/rollin_tokens": 5 / 3})


def test_offline_responses_column_fallback_and_errors(tiny_model_dir):
    """chosen, else response, else completion; a row without one is never reset; responses are
    rendered as completions (ending at EOS) and cut to max_new_tokens; errors name the setting."""
    _, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    table = RowTable([{"prompt": "a", "response": "e e"}, {"prompt": "b"}])
    assert choose_reset_column(table, None) == "response"
    assert choose_reset_column(RowTable([{"prompt": "a", "completion": "x", "response": "y"}]), None) == "response"
    ids = offline_responses(table, tokenizer, "response", chat=False, max_new_tokens=8)
    assert ids[0] == tokenizer("e e", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[1] is None
    assert len(offline_responses(RowTable([{"prompt": "a", "chosen": E_RICH}]), tokenizer, "chosen", chat=False,
                                 max_new_tokens=5)[0]) == 5
    with pytest.raises(ValueError, match="reset_column='answer'"):
        choose_reset_column(table, "answer")
    with pytest.raises(ValueError, match="no row of .* has a chosen, response, completion column"):
        choose_reset_column(RowTable([{"prompt": "a"}]), None)
    with pytest.raises(ValueError, match="ServerRollout cannot"):
        load_reset_responses(table, tokenizer, OnlineSettings(reset_prob=1.0), chat=False,
                             engine=ServerRollout.__new__(ServerRollout))


def test_drpo_learns_count_e_from_e_rich_resets(tiny_model_dir, tmp_path):
    """40 steps, every sample reset into a prefix of 'e e e ...' (k uniform on 1..7), held-out
    prompts sampled without roll-in at steps 0 and 40 (4 samples each). Measured: eval/reward
    0.44 -> 7.9 e's per 8 tokens; every sample reset, 4.07 tokens rolled in per sample.
    Against ppo (same data, temperature 0.7, no resets), eval/reward at steps 10 / 20 / 30 for
    seeds 42, 1, 2: ppo 3.2 / 5.4 / 8.0, 3.1 / 6.6 / 8.0, 2.3 / 4.9 / 8.0; drpo 1.4 / 5.1 / 4.3,
    0.5 / 4.3 / 5.4, 0.4 / 4.3 / 4.2. Resets slowed learning here: count_e is a per-token sum,
    so a reset state teaches nothing a fresh sample would not, and the roll-in's random e count
    adds reward variance that the fresh critic cannot yet explain."""
    run("drpo", tiny_model_dir, tmp_path / "drpo", steps=40, eval_data=[{"prompt": p} for p in PROMPTS],
        eval_steps=40, eval_samples=4)
    rows = read_metrics(tmp_path / "drpo")
    train = [r for r in rows if "reward/mean" in r]
    assert all(r["drpo/reset_fraction"] == 1.0 for r in train)
    assert 3.0 < sum(r["drpo/rollin_tokens"] for r in train) / len(train) < 5.0  # E[k] = 4 on 1..7
    start, end = rows[0]["eval_start/reward"], rows[-1]["eval/reward"]  # before step 1, after step 40
    assert end > start + 4.0, (start, end)


def test_drpo_resumes_exactly(tiny_model_dir, tmp_path):
    """Resets are drawn from (seed, step, round, row): the resumed run rolls in what the full run
    did, reset_prob 0.5 so that some rows are not reset."""
    train = partial(run, "drpo", tiny_model_dir, steps=6, save_steps=3, lr=5e-3, reset_prob=0.5)
    runs = run_interrupted_and_resumed(train, tmp_path, at=5)
    keys = ("loss", "reward/mean", "kl", "value_loss", "grad_norm", "drpo/reset_fraction", "drpo/rollin_tokens")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6))
    assert 0.0 < sum(r["drpo/reset_fraction"] for r in runs.full) / 6 < 1.0
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


@pytest.mark.parametrize(("algorithm", "settings", "message"), [
    ("drpo", {"data": [{"prompt": p} for p in PROMPTS]}, "no row of .* has a chosen, response, completion column"),
    ("drpo", {"reset_column": "answer"}, "reset_column='answer'"),
    ("drpo", {"reset_prob": 1.5}, "reset_prob must be in"),
    ("raft", {"reset_prob": 1.0}, "needs objective=policy_gradient"),
    ("grpo", {"whiten_rewards": True}, "whiten_rewards whitens GAE"),
])
def test_bad_drpo_settings_are_refused(algorithm, settings, message, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(algorithm, tiny_model_dir, tmp_path / "bad", steps=1, **settings)
