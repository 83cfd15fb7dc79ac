"""ma_ppo (MA-RLHF, GAE over macro actions): spans of the fixed, random and perplexity rules
and the three macro-value aggregations by worked examples; macro GAE by hand on one 5-token
sample; fixed n = 1 equals token-level GAE exactly; padding ignored; on a tiny model ma_ppo
learns the rule reward, macro_n=1 reproduces the ppo preset's run, random spans resume
exactly, bad settings are refused."""

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
)
from test_online import one_thread, run  # noqa: F401  (one_thread: the module's autouse fixture)

from alignkit.advantages import gae, token_level_rewards
from alignkit.training.online.macro import (
    RANDOM_LENGTHS,
    aggregate,
    broadcast,
    fixed_starts,
    macro_gae,
    macro_spans,
    perplexity_starts,
    random_lengths,
    span_weights,
    spans_from_starts,
    starts_from_lengths,
)


def prefix_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width) < torch.tensor(lengths).unsqueeze(-1)


def fixed(lengths: list[int], n: int, width: int | None = None) -> list[list[int]]:
    mask = prefix_mask(lengths, width or max(lengths))
    return spans_from_starts(fixed_starts(mask, n), mask).tolist()


def test_fixed_ngram_spans_keep_the_last_token_alone():
    """n = 2 over 5 tokens: [0 1][2 3][4]; n = 5 over 5: the first 4, then the last alone (the
    code's [4, 1]); over 6: [5, 1] (the code adds an empty span here); over 7: [5, 1, 1]."""
    assert fixed([5], 2) == [[0, 0, 1, 1, 2]]
    assert fixed([5], 5) == [[0, 0, 0, 0, 1]]
    assert fixed([6], 5) == [[0, 0, 0, 0, 0, 1]]
    assert fixed([7], 5) == [[0, 0, 0, 0, 0, 1, 2]]
    assert fixed([4], 1) == [[0, 1, 2, 3]]
    # per row, padding (-1) is no span; an empty row has none
    assert fixed([3, 1, 0], 2, width=4) == [[0, 0, 1, -1], [0, -1, -1, -1], [-1, -1, -1, -1]]


def test_spans_of_given_lengths_then_the_rest_then_the_last():
    """Lengths 2, 1, 3 over 10 tokens: [0 1][2][3 4 5], the rest [6 7 8] as one span (the code's
    'length infinity'), then token 9 alone; lengths longer than the row just end at its end."""
    mask = prefix_mask([10, 5], 10)
    starts = starts_from_lengths(mask, torch.tensor([[2, 1, 3], [10, 1, 1]]))
    assert spans_from_starts(starts, mask).tolist() == [[0, 0, 1, 2, 2, 2, 3, 3, 3, 4],
                                                        [0, 0, 0, 0, 1, -1, -1, -1, -1, -1]]


def test_random_lengths_are_the_code_pool_shuffled_per_row_and_seeded():
    """Each row: {1, 2, 3, 5, 10} x repeat in some order; the same seed gives the same draws,
    another seed others (the loop seeds by (seed, step), so a resumed step cuts the same spans)."""
    lengths = random_lengths(3, 2, torch.Generator().manual_seed(0))
    assert lengths.shape == (3, 10)
    assert all(sorted(row) == sorted(RANDOM_LENGTHS * 2) for row in lengths.tolist())
    assert len({tuple(row) for row in lengths.tolist()}) > 1  # a fresh order per row
    assert torch.equal(lengths, random_lengths(3, 2, torch.Generator().manual_seed(0)))
    assert not torch.equal(lengths, random_lengths(3, 2, torch.Generator().manual_seed(1)))
    mask = prefix_mask([30, 30], 30)
    spans = macro_spans("random", mask, repeat=1, seed=7)
    assert torch.equal(spans, macro_spans("random", mask, repeat=1, seed=7))
    sizes = [torch.bincount(row).tolist() for row in spans]
    for row, draw in zip(sizes, random_lengths(2, 1, torch.Generator().manual_seed(7)).tolist(), strict=True):
        # the five drawn lengths (sum 21), the 8 tokens left as one span, the last token alone
        assert row == [*draw, 8, 1], (row, draw)


def test_perplexity_spans_start_where_the_reference_perplexity_rises():
    """ppl 3, 2, 4, 1, 5, 2: it rises at token 2 (2 -> 4) and token 4 (1 -> 5): spans [0 1][2 3][4],
    and the last token alone: [0, 0, 1, 1, 2, 3]. Padding is skipped: the comparison is with the
    previous valid token."""
    ppl = torch.tensor([[3.0, 2.0, 4.0, 1.0, 5.0, 2.0]])
    ref_logp = -ppl.log()
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert perplexity_starts(ref_logp, mask).tolist() == [[False, False, True, False, True, False]]
    assert macro_spans("perplexity", mask, ref_logp=ref_logp).tolist() == [[0, 0, 1, 1, 2, 3]]
    holes = torch.tensor([[True, True, False, True, True, True]])  # token 2 masked: 3, 2, (4), 1, 5, 2
    assert macro_spans("perplexity", holes, ref_logp=ref_logp).tolist() == [[0, 0, -1, 0, 1, 2]]
    with pytest.raises(ValueError, match="reference"):
        macro_spans("perplexity", mask)


@pytest.mark.parametrize(("how", "expected"), [
    ("equal", [6.0, 7.0]),             # (3 + 6 + 9) / 3 ; the one-token span is its token
    ("unit", [9.0, 7.0]),              # the span's last token
    ("position", [54.0 / 11, 7.0]),    # (3/1 + 6/2 + 9/3) / (1 + 1/2 + 1/3) = 9 / (11/6)
])
def test_macro_value_aggregations_worked_example(how, expected):
    spans = torch.tensor([[0, 0, 0, 1, -1]])
    values = torch.tensor([[3.0, 6.0, 9.0, 7.0, 100.0]])  # 100: padding, ignored
    weights = span_weights(spans, how)
    macro, exists = aggregate(values, spans, weights)
    assert macro[0].tolist() == pytest.approx(expected)
    assert exists.tolist() == [[True, True]]
    torch.testing.assert_close(aggregate(torch.ones_like(values), spans, weights)[0], torch.ones(1, 2))  # sum 1
    assert weights[0, 4] == 0
    assert broadcast(macro, spans)[0].tolist() == pytest.approx([expected[0]] * 3 + [expected[1], 0.0])


def test_macro_gae_by_hand_on_one_five_token_sample():
    """Fixed n = 2, equal weights: spans [0 1][2 3][4].
    token rewards 0.2, 0, -0.4, 0, 1 -> macro rewards 0.1, -0.2, 1; values 0.5, 0.3, 0.2, 0.6, 0.8
    -> macro values 0.4, 0.4, 0.8. gamma 1, lambda 0.5, V after the end 0:
      d3 = 1 - 0.8 = 0.2                      A3 = 0.2             G3 = 1.0
      d2 = -0.2 + 0.8 - 0.4 = 0.2             A2 = 0.2 + 0.5 x 0.2 = 0.3    G2 = 0.7
      d1 = 0.1 + 0.4 - 0.4 = 0.1              A1 = 0.1 + 0.5 x 0.3 = 0.25   G1 = 0.65
    gamma 0.5, lambda 1 (discounting per macro step, not per token):
      d3 = 0.2; d2 = -0.2 + 0.5 x 0.8 - 0.4 = -0.2; d1 = 0.1 + 0.5 x 0.4 - 0.4 = -0.1
      A3 = 0.2, A2 = -0.2 + 0.5 x 0.2 = -0.1, A1 = -0.1 + 0.5 x -0.1 = -0.15"""
    token_rewards = torch.tensor([[0.2, 0.0, -0.4, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.3, 0.2, 0.6, 0.8]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    spans = macro_spans("fixed", mask, n=2)
    advantages, returns = macro_gae(token_rewards, values, mask, spans, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.25, 0.25, 0.3, 0.3, 0.2]]))
    torch.testing.assert_close(returns, torch.tensor([[0.65, 0.65, 0.7, 0.7, 1.0]]))
    advantages, _ = macro_gae(token_rewards, values, mask, spans, gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[-0.15, -0.15, -0.1, -0.1, 0.2]]))


def test_the_terminal_reward_is_not_averaged_into_a_span():
    """n = 5 over 5 tokens, equal: the last token is a span of its own, so its macro reward is
    R - beta KL_5 = 2 - 0.5 exactly, not (sum of the 5 token rewards) / 5."""
    mask = torch.ones(1, 5, dtype=torch.bool)
    token_rewards = token_level_rewards(torch.tensor([2.0]), mask, torch.full((1, 5), 0.5))
    spans = macro_spans("fixed", mask, n=5)
    macro, _ = aggregate(token_rewards, spans, span_weights(spans))
    assert macro[0].tolist() == pytest.approx([-0.5, 1.5])


def test_fixed_one_gram_is_token_level_gae_exactly():
    """n = 1 with every aggregation: the same advantages and returns as `gae`, bit for bit,
    on rows of different lengths with padding."""
    torch.manual_seed(0)
    mask = prefix_mask([7, 3, 5, 1], 7)
    token_rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    expected = gae(token_rewards, values, mask, gamma=0.9, lam=0.95)
    spans = macro_spans("fixed", mask, n=1)
    for how in ("equal", "unit", "position"):
        got = macro_gae(token_rewards, values, mask, spans, gamma=0.9, lam=0.95, value=how)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), how


@pytest.mark.parametrize("termination", ["fixed", "random", "perplexity"])
def test_padding_changes_nothing(termination):
    """Rows padded to another width, with garbage at the padded positions: the same advantages
    and returns on the valid tokens, 0 on the padding."""
    torch.manual_seed(1)
    lengths = [6, 2, 4]
    mask = prefix_mask(lengths, 6)
    token_rewards, values, ref_logp = torch.randn(3, 6), torch.randn(3, 6), -torch.rand(3, 6)
    wide = prefix_mask(lengths, 9)

    def padded(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.full((3, 3), 50.0)], dim=1).masked_fill(~wide, 50.0)

    results = []
    for m, r, v, ref in ((mask, token_rewards, values, ref_logp),
                         (wide, padded(token_rewards), padded(values), padded(ref_logp))):
        spans = macro_spans(termination, m, n=3, repeat=1, ref_logp=ref, seed=3)
        results.append(macro_gae(r, v, m, spans, gamma=1.0, lam=0.95))
    for narrow, broad in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(broad[:, :6], narrow)
        assert bool((broad[~wide] == 0).all()) and bool((narrow[~mask] == 0).all())


def test_ma_ppo_learns_the_rule_reward(tiny_model_dir, tmp_path):
    """count_e, 40 steps, fixed 5-grams on 8-token completions (spans [5][2][1]). Measured: the
    mean reward of the first 5 steps 0.30, of the last 5 7.99 (8 is every token an e; reached
    from step 27 on); token-level ppo on the same settings 0.30 -> 7.89; random, perplexity,
    unit and position 7.91, 7.96, 7.99, 7.99."""
    run("ma_ppo", tiny_model_dir, tmp_path / "ma", steps=40)
    rows = read_metrics(tmp_path / "ma")
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 5.0, (first, last)
    assert all(key in rows[0] for key in ("value_loss", "explained_variance", "kl", "advantages/mean"))
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_macro_n_one_is_the_ppo_preset(tiny_model_dir, tmp_path):
    """ma_ppo with macro_n=1 and ppo: the same run, metric for metric and weight for weight."""
    ma = run("ma_ppo", tiny_model_dir, tmp_path / "ma1", steps=3, macro_n=1)
    ppo = run("ppo", tiny_model_dir, tmp_path / "ppo", steps=3)
    for a, b in zip(read_metrics(tmp_path / "ma1"), read_metrics(tmp_path / "ppo"), strict=True):
        for key in ("loss", "reward/mean", "kl", "value_loss", "advantages/mean", "advantages/std", "grad_norm"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert_same_parameters(ma.model, ppo.model)


def test_macro_actions_change_the_update(tiny_model_dir, tmp_path):
    """The other rules and aggregations reach the loop: each gives other advantages than
    token-level ppo at step 1 (same samples, same rewards)."""
    base = read_metrics(run("ppo", tiny_model_dir, tmp_path / "ppo", steps=1).output_dir)[0]
    for name, extra in {"random": {"macro_termination": "random"},
                        "perplexity": {"macro_termination": "perplexity"},
                        "unit": {"macro_value": "unit"}, "position": {"macro_value": "position"}}.items():
        row = read_metrics(run("ma_ppo", tiny_model_dir, tmp_path / name, steps=1, **extra).output_dir)[0]
        assert row["reward/mean"] == base["reward/mean"], name
        assert row["advantages/max"] != base["advantages/max"], name


def test_random_macro_actions_resume_exactly(tiny_model_dir, tmp_path):
    train = partial(run, "ma_ppo", tiny_model_dir, steps=6, save_steps=3, lr=5e-3, macro_termination="random",
                    macro_repeat=1)
    runs = run_interrupted_and_resumed(train, tmp_path, at=5)
    keys = ("loss", "reward/mean", "kl", "value_loss", "advantages/max", "grad_norm")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6))
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


@pytest.mark.parametrize(("algorithm", "settings", "message"), [
    ("ma_ppo", {"macro_termination": "parse"}, "macro_termination must be one of"),
    ("ma_ppo", {"macro_value": "mean"}, "macro_value must be one of"),
    ("ma_ppo", {"macro_n": 0}, "macro_n and macro_repeat must be >= 1"),
    ("ma_ppo", {"macro_termination": "perplexity", "beta": 0.0}, "perplexity reads the reference"),
    ("grpo", {"macro_termination": "fixed"}, "advantage=gae and a critic"),
])
def test_bad_macro_settings_are_refused(algorithm, settings, message, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(algorithm, tiny_model_dir, tmp_path / "bad", steps=1, **settings)
