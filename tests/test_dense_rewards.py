"""Dense rewards (Fine-Grained RLHF, Wu et al. 2023): the accepted forms and their refusals, and
worked examples of where the rewards land: token_level_rewards with the KL, GAE, REINFORCE++'s
return-to-go (and its group baseline), the sequence-level penalties on the last token, several
rewards with one dense, segment ends on the sampled tokens."""

from __future__ import annotations

import pytest
import torch

from alignkit.advantages import (
    discounted_returns,
    gae,
    masked_whiten,
    reinforce_pp,
    reinforce_pp_baseline,
    token_level_rewards,
)
from alignkit.rewards import score_safely
from alignkit.rewards.dense import DenseRewards, as_scores, concat_scores
from alignkit.rewards.process import segment_end_tokens, split_segments, token_char_ends
from alignkit.testing import build_tiny_tokenizer
from alignkit.training.online.multi_reward import MultiReward
from alignkit.training.online.presets import OnlineSettings
from alignkit.training.online.roles import FunctionReward, SequenceBatch
from alignkit.training.online.sampling import merge_dense
from alignkit.training.online.steps import (
    check_dense_settings,
    compute_advantages,
    shape_dense_rewards,
)

MASK = torch.tensor([[True, True, True], [True, True, False]])  # 3 and 2 response tokens


def two_row_batch() -> SequenceBatch:
    """Prompt token 5, then responses (10, 11, 12) and (20, 21), right-padded with 0."""
    input_ids = torch.tensor([[5, 10, 11, 12], [5, 20, 21, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    sequence = torch.tensor([[False, True, True, True], [False, True, True, False]])
    return SequenceBatch(input_ids, attention, sequence, MASK)


def test_token_level_rewards_puts_dense_rewards_at_their_tokens_with_the_kl():
    """dense (0.5, 0, 1.0 | pad) - KL (0.1, 0.2, 0.3 | 9) = (0.4, -0.2, 0.7, 0); the scalar 1.5
    (the same total) all on the last token: (-0.1, -0.2, 1.2, 0)."""
    mask = torch.tensor([[True, True, True, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0]])
    dense = token_level_rewards(torch.tensor([[0.5, 0.0, 1.0, 0.0]]), mask, kl)
    torch.testing.assert_close(dense, torch.tensor([[0.4, -0.2, 0.7, 0.0]]))
    scalar = token_level_rewards(torch.tensor([1.5]), mask, kl)
    torch.testing.assert_close(scalar, torch.tensor([[-0.1, -0.2, 1.2, 0.0]]))
    # R on the last token alone is the scalar form exactly (bit for bit)
    at_last = token_level_rewards(torch.tensor([[0.0, 0.0, 1.5, 0.0]]), mask, kl)
    assert torch.equal(at_last, scalar)


def test_gae_on_one_sample_of_three_dense_tokens_by_hand():
    """r = (1, 0, 2), V = (0.5, 1.0, 1.5), gamma 1, lambda 0.5:
    delta_2 = 2 - 1.5 = 0.5                 A_2 = 0.5
    delta_1 = 0 + 1.5 - 1.0 = 0.5           A_1 = 0.5 + 0.5 x 0.5 = 0.75
    delta_0 = 1 + 1.0 - 0.5 = 1.5           A_0 = 1.5 + 0.5 x 0.75 = 1.875
    returns A + V = (2.375, 1.75, 2.0). The same total 3 as a scalar (r = (0, 0, 3)) gives
    A = (1.125, 1.25, 1.5): the dense reward credits the first token more."""
    settings = OnlineSettings(advantage="gae", critic="separate", gamma=1.0, lam=0.5)
    mask, values = torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = compute_advantages(settings, torch.tensor([3.0]), torch.zeros(1), mask, None, values,
                                             None, dense=torch.tensor([[1.0, 0.0, 2.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[1.875, 0.75, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[2.375, 1.75, 2.0]]))
    scalar, _ = gae(token_level_rewards(torch.tensor([3.0]), mask), values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(scalar, torch.tensor([[1.125, 1.25, 1.5]]))


def test_reinforce_pp_return_to_go_over_dense_rewards_by_hand():
    """dense ((1, 0, 2), (0, 3 | pad)), KL 0.2 per token, gamma 0.5: r = ((0.8, -0.2, 1.8),
    (-0.2, 2.8)); G_2 = 1.8, G_1 = -0.2 + 0.5 x 1.8 = 0.7, G_0 = 0.8 + 0.35 = 1.15; row 2:
    G_1 = 2.8, G_0 = -0.2 + 1.4 = 1.2. A = (G - 1.53) / sqrt(0.5256) over the 5 valid tokens."""
    dense = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    kl = torch.where(MASK, 0.2, 0.0)
    returns = discounted_returns(token_level_rewards(dense, MASK, kl), MASK, 0.5)
    torch.testing.assert_close(returns, torch.tensor([[1.15, 0.7, 1.8], [1.2, 2.8, 0.0]]))
    advantages = reinforce_pp(dense.sum(-1), torch.tensor([0, 1]), MASK, kl_penalty=kl, gamma=0.5,
                              dense_rewards=dense)
    expected = torch.where(MASK, (returns - 1.53) / (0.5256 + 1e-8) ** 0.5, 0.0)
    torch.testing.assert_close(advantages, expected)


def test_reinforce_pp_baseline_subtracts_the_group_mean_sum_on_the_last_token():
    """One group, sums (3, 3): mean 3 comes off each last token: dense ((1, 0, -1), (0, 0));
    G (gamma 1) = ((0, -1, -1), (0, 0)), then whitened."""
    dense = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    advantages = reinforce_pp_baseline(dense.sum(-1), torch.tensor([0, 0]), MASK, dense_rewards=dense)
    expected = masked_whiten(torch.tensor([[0.0, -1.0, -1.0], [0.0, 0.0, 0.0]]), MASK)
    torch.testing.assert_close(advantages, expected)


def test_per_segment_and_per_token_forms_land_on_their_tokens():
    """Pairs (0, 0.5), (2, -1.0), (2, 0.25) on 3 tokens -> (0.5, 0, -0.75) (same token: added);
    a dict {1: 2.0} on 2 tokens -> (0, 2); per-token lists and an (N, T) tensor as given."""
    segments = as_scores([[(0, 0.5), (2, -1.0), (2, 0.25)], {1: 2.0}], 2, [3, 2])
    torch.testing.assert_close(segments.tokens, torch.tensor([[0.5, 0.0, -0.75], [0.0, 2.0, 0.0]]))
    torch.testing.assert_close(segments.totals, torch.tensor([-0.25, 2.0]))
    tokens = as_scores([[1, 2, 3], [4, 5]], 2, [3, 2])
    torch.testing.assert_close(tokens.tokens, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]))
    tensor = as_scores(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]), 2, [1, 2])
    torch.testing.assert_close(tensor.tokens, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(as_scores([1.0, 2.0], 2, [3, 2]), torch.tensor([1.0, 2.0]))  # scalars stay scalars
    no_segments = as_scores([[], [(1, 1.0)]], 2, [3, 2])
    assert no_segments.totals.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(("values", "message"), [
    ([[1.0, 2.0], [4.0, 5.0]], r"item 0 has 2 per-token rewards but the sample has 3 response tokens"),
    ([[(3, 1.0)], []], r"item 0 has segment 0 ending at token 3, outside the sample's 3 response tokens"),
    ([[(0.5, 1.0)], []], r"item 0 has segment 0 ending at the single number 0.5, not an integer"),
    ([[(0, "good")], []], r"item 0 has segment 0 with reward the str 'good', not a number"),
    ([1.0, [1.0, 2.0]], r"item 0 is a number but item 1 is a list of 2 values"),
    (torch.ones(2, 3), r"shape \(2, 3\) with a reward at column 2 of sample 1, which has 2 response tokens"),
    (torch.ones(2, 2), r"sample 0 has 3 response tokens, more than its 2 columns"),
    ([["x"], []], r"item 0 has reward the str 'x' at token 0, not a number"),
])
def test_bad_dense_outputs_name_the_reward_the_row_and_the_problem(values, message):
    with pytest.raises(ValueError, match=message) as error:
        score_safely(lambda prompts, completions: values, ["p", "q"], ["a", "b"], token_counts=[3, 2])
    assert str(error.value).startswith("reward ") and "\n" not in str(error.value)


def test_failed_dense_rows_get_the_penalty_on_their_last_token():
    """Row 0 has a NaN token: raise names it; penalty mode puts -1 on its last token."""
    def reward(prompts, completions):
        return [[1.0, float("nan"), 0.0], [1.0, 2.0]]

    with pytest.raises(ValueError, match=r"row 0 .*non-finite per-token reward \(\[1.0, nan, 0.0\]\)"):
        score_safely(reward, ["p", "q"], ["a", "b"], token_counts=[3, 2])
    scores, penalised = score_safely(reward, ["p", "q"], ["a", "b"], token_counts=[3, 2], on_error="penalty")
    assert penalised == 1
    torch.testing.assert_close(scores.tokens, torch.tensor([[0.0, 0.0, -1.0], [1.0, 2.0, 0.0]]))


def test_function_reward_role_gives_dense_rewards_of_the_batch_width_from_completion_ids():
    """Per-token reward id / 10 of each sampled token: ((1.0, 1.1, 1.2), (2.0, 2.1 | 0)); a
    length that is not the sample's token count is an error naming the reward and the row."""
    def tenths(prompts, completions, completion_ids):
        return [[i / 10 for i in ids] for ids in completion_ids]

    scores, _ = FunctionReward(tenths).score(two_row_batch(), ["p", "q"], ["a", "b"], {})
    assert isinstance(scores, DenseRewards) and scores.tokens.shape == (2, 3)
    torch.testing.assert_close(scores.tokens, torch.tensor([[1.0, 1.1, 1.2], [2.0, 2.1, 0.0]]))

    def one_short(prompts, completions, completion_ids):
        return [[1.0] * (len(ids) - (i == 1)) for i, ids in enumerate(completion_ids)]

    with pytest.raises(ValueError, match=r"reward .*one_short returned .* item 1 has 1 per-token rewards but the "
                                         r"sample has 2 response tokens"):
        FunctionReward(one_short).score(two_row_batch(), ["p", "q"], ["a", "b"], {})


def test_chunks_scored_in_threads_join_dense_and_scalar_rows():
    """A scalar chunk (rows 0-1) beside a dense one (row 2): the scalars go on their last tokens."""
    joined = concat_scores([torch.tensor([1.0, 2.0]), DenseRewards(torch.tensor([[0.5, 0.5, 0.5]]),
                                                                   torch.tensor([3]))], [[2, 1], [3]])
    torch.testing.assert_close(joined.tokens, torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.5, 0.5, 0.5]]))


def test_missing_eos_and_overlong_penalties_go_on_the_last_token():
    """missing_eos_penalty 1 on row 0 (no EOS): (1, 0, 2) -> (1, 0, 1); row 1 unchanged."""
    settings = OnlineSettings(missing_eos_penalty=1.0)
    dense = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    shaped = shape_dense_rewards(dense, MASK, torch.tensor([True, False]), settings, torch.tensor([3, 2]))
    torch.testing.assert_close(shaped, torch.tensor([[1.0, 0.0, 1.0], [0.0, 3.0, 0.0]]))
    with pytest.raises(ValueError, match=r"reward f gives per-token rewards of shape \(2, 3\), but reward_norm"):
        check_dense_settings(OnlineSettings(reward_norm=True), "reward f", (2, 3))


def test_several_rewards_add_dense_ones_at_their_tokens_and_scalar_ones_on_the_last():
    """w = (1, 0.5): dense id / 10 + 0.5 x scalar (10, 20) on the last token:
    ((1.0, 1.1, 1.2 + 5), (2.0, 2.1 + 10)); reward/NAME logs each one's sum."""
    def tenths(prompts, completions, completion_ids):
        return [[i / 10 for i in ids] for ids in completion_ids]

    def fixed(prompts, completions):
        return [10.0, 20.0]

    role = MultiReward([FunctionReward(tenths), FunctionReward(fixed)], ["tenths", "fixed"], [1.0, 0.5], "sum", 2)
    scores, _ = role.score(two_row_batch(), ["p", "q"], ["a", "b"], {})
    torch.testing.assert_close(scores.tokens, torch.tensor([[1.0, 1.1, 6.2], [2.0, 12.1, 0.0]]))
    drained = role.drain()
    torch.testing.assert_close(drained["tenths"], torch.tensor([3.3, 4.1]))
    gdpo = MultiReward([FunctionReward(tenths), FunctionReward(fixed)], ["tenths", "fixed"], [1.0, 1.0],
                       "normalize_then_sum", 2)
    with pytest.raises(ValueError, match="reward tenths gives per-token rewards, but reward_aggregation="
                                         "normalize_then_sum"):
        gdpo.score(two_row_batch(), ["p", "q"], ["a", "b"], {})


def test_dense_rows_of_several_rounds_are_padded_to_the_merged_width():
    merged = merge_dense([torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0, 5.0]])], 4)
    torch.testing.assert_close(merged, torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 5.0, 0.0]]))


def test_segment_ends_map_onto_the_sampled_tokens():
    """'The movie was good. The film was awful.' + EOS, tokenised by the tiny BPE: the first
    sentence ends on the token whose decoded prefix first reaches its '.', the second on the
    last text token (not the EOS, which decodes to nothing)."""
    tokenizer = build_tiny_tokenizer(vocab_size=290)
    text = "The movie was good. The film was awful."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ends = token_char_ends(tokenizer, ids)
    assert ends[-1] == ends[-2] == len(text) and ends == sorted(ends)
    first, second = segment_end_tokens(ends, [end for _, end in split_segments(text)])
    assert tokenizer.decode(ids[: first + 1]) == "The movie was good."
    assert tokenizer.decode(ids[:first]) != "The movie was good."
    assert second == len(ids) - 2
    assert segment_end_tokens([3, 7, 9, 9], [7, 9, 12]) == [1, 2, 3]  # past the text: the last token
