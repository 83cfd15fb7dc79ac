"""Reward contract, safe scoring, loading by spec, and the built-in rule rewards on real text."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from alignkit.rewards import (
    BUILTIN_REWARDS,
    JsonValid,
    LengthTarget,
    NumericAnswerMatch,
    RegexMatch,
    RewardError,
    RewardFunction,
    VaderSentiment,
    as_reward_tensor,
    extract_final_number,
    load_reward,
    score_safely,
)

# ---------------------------------------------------------------- contract


def test_as_reward_tensor_accepts_lists_numpy_tensors():
    for values in ([1, 2.5], np.array([1.0, 2.5]), torch.tensor([1.0, 2.5], dtype=torch.float64)):
        out = as_reward_tensor(values, 2)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.tensor([1.0, 2.5]))
    assert as_reward_tensor([[1, 2], [3, 4], [5, 6]], 3).shape == (3, 2)  # multi-objective
    assert as_reward_tensor(0.5, 1).shape == (1,)


def test_as_reward_tensor_wrong_length_is_a_clear_error():
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        as_reward_tensor([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match="must be numbers"):
        as_reward_tensor(["good", "bad"], 2)


def test_builtins_follow_the_protocol():
    for reward in (VaderSentiment(), LengthTarget(5), RegexMatch("x"), JsonValid()):
        assert isinstance(reward, RewardFunction)
        assert reward(["p", "q"], ["a x", "{}"]).shape == (2,)


# ---------------------------------------------------------------- score_safely


def _fragile(prompts, completions):
    """Raises on any completion containing 'boom', NaN on 'nan', else its word count."""
    out = []
    for text in completions:
        if "boom" in text:
            raise KeyError("boom")
        out.append(float("nan") if "nan" in text else float(len(text.split())))
    return out


def test_score_safely_passes_good_batches_through():
    scores, penalised = score_safely(_fragile, ["p1", "p2"], ["a b", "c"])
    torch.testing.assert_close(scores, torch.tensor([2.0, 1.0]))
    assert penalised == 0


def test_score_safely_names_the_failing_row():
    prompts = ["first prompt", "Second prompt that is long " * 5, "third"]
    with pytest.raises(RewardError) as info:
        score_safely(_fragile, prompts, ["fine", "it went boom", "ok"])
    message = str(info.value)
    assert "row 1" in message and "KeyError" in message and "boom" in message
    assert "Second prompt that is long" in message
    assert prompts[1][:60] in message and prompts[1][:61] not in message  # first 60 chars only


def test_score_safely_nan_raises_or_is_penalised():
    with pytest.raises(RewardError, match=r"row 2 .*non-finite"):
        score_safely(_fragile, ["a", "b", "c"], ["x", "y", "nan here"])
    scores, penalised = score_safely(
        _fragile,
        ["a", "b", "c", "d"],
        ["x y", "boom", "nan", "z"],
        on_error="penalty",
        penalty=-5.0,
    )
    torch.testing.assert_close(scores, torch.tensor([2.0, -5.0, -5.0, 1.0]))
    assert penalised == 2


def test_score_safely_slices_columns_and_drops_unwanted_ones():
    def needs_answer(prompts, completions, answer):
        if "bad" in answer:
            raise ValueError("bad answer")
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    scores, penalised = score_safely(
        needs_answer,
        ["p"] * 3,
        ["1", "2", "3"],
        answer=["1", "bad", "4"],
        other_column=[0, 0, 0],  # not a parameter of needs_answer: not passed
        on_error="penalty",
    )
    torch.testing.assert_close(scores, torch.tensor([1.0, -1.0, 0.0]))
    assert penalised == 1


def test_score_safely_wrong_length_raises_even_in_penalty_mode():
    with pytest.raises(ValueError, match="1 values for a batch of 2"):
        score_safely(lambda p, c: [1.0], ["a", "b"], ["x", "y"], on_error="penalty")


def test_score_safely_multi_objective_penalises_whole_row():
    def two_objectives(prompts, completions, **columns):
        return [[1.0, float("inf") if c == "bad" else 2.0] for c in completions]

    scores, penalised = score_safely(two_objectives, ["a", "b"], ["ok", "bad"], on_error="penalty")
    torch.testing.assert_close(scores, torch.tensor([[1.0, 2.0], [-1.0, -1.0]]))
    assert penalised == 1


# ---------------------------------------------------------------- VADER


def test_vader_on_real_reviews():
    reward = VaderSentiment()
    scores = reward(
        ["Write a review.", "Write a review.", "Write a review."],
        [
            "This movie was wonderful, I loved it!",
            "Terrible, boring, awful film.",
            "The film is 120 minutes long.",
        ],
    )
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores[0] > 0.5
    assert scores[1] < -0.5
    assert abs(scores[2]) < 0.1  # neutral statement
    assert bool(((scores >= -1) & (scores <= 1)).all())


def test_vader_matches_the_library_and_is_fast_on_batches():
    import time

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = [f"Review {i}: the plot was good but the ending was really bad." for i in range(300)]
    start = time.perf_counter()
    scores = VaderSentiment()(["p"] * 300, texts)
    elapsed = time.perf_counter() - start
    expected = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts[:3]]
    torch.testing.assert_close(scores[:3], torch.tensor(expected))
    assert elapsed < 2.0  # ~30 ms measured; generous for shared CPUs


# ---------------------------------------------------------------- rule rewards


def test_length_target_words_and_chars():
    """target 4 words, scale 4: 4 words -> 0 ; 6 words -> -2/4 ; 0 words -> -1."""
    reward = LengthTarget(4)
    torch.testing.assert_close(
        reward(["p"] * 3, ["a b c d", "a b c d e f", ""]), torch.tensor([0.0, -0.5, -1.0])
    )
    # chars: |5 - 10| / 2 = 2.5
    torch.testing.assert_close(
        LengthTarget(10, unit="chars", scale=2)(["p"], ["hello"]), torch.tensor([-2.5])
    )
    with pytest.raises(ValueError, match="unit"):
        LengthTarget(3, unit="tokens")


def test_regex_match_format_reward():
    import re

    reward = RegexMatch(r"^<think>.*</think>\s*<answer>.*</answer>$", reward=1.0, flags=re.DOTALL)
    scores = reward(
        ["q"] * 3,
        [
            "<think>2 + 2\nis 4</think> <answer>4</answer>",
            "<answer>4</answer>",
            "<think>x</think><answer>4</answer> trailing",
        ],
    )
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(
        RegexMatch("yes", reward=2.0, penalty=-1.0)(["p", "p"], ["oh yes", "no"]),
        torch.tensor([2.0, -1.0]),
    )


GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GSM8K_ANSWER, 72.0),
        ("The total is $1,234.50 after 3 days.", 3.0),  # last number wins without ####
        ("The total after 3 days is $1,234.50.", 1234.5),
        ("#### -12", -12.0),
        ("Step 1: 5 apples. #### 1,000 (one thousand)", 1000.0),
        ("no digits at all", None),
        ("1,2,3", 3.0),  # a list, not thousands grouping
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_numeric_answer_match_on_gsm8k_strings():
    reward = NumericAnswerMatch()
    completions = [
        "In May she sold 24 clips, so 48 + 24 = 72 clips in total.",
        "She sold 48 + 24 = 72 clips.\n#### 72",
        "The answer is 70.",
        "I am not sure.",
        "Total: 1,000 dollars",
    ]
    answers = [GSM8K_ANSWER, GSM8K_ANSWER, GSM8K_ANSWER, GSM8K_ANSWER, 1000]
    scores = reward(["q"] * 5, completions, answer=answers)
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="'answer' column"):
        reward(["q"], ["42"])


def test_json_valid():
    completions = [
        '{"name": "Ada", "age": 36}',
        "  [1, 2, 3]\n",
        'Here you go:\n```json\n{"ok": true}\n```\nAnything else?',
        "{'single': 'quotes'}",
        "```json\n{broken\n```",
        "plain text",
    ]
    scores = JsonValid()(["p"] * len(completions), completions)
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))


# ---------------------------------------------------------------- load_reward


def test_load_builtin_rewards():
    assert set(BUILTIN_REWARDS) == {
        "vader", "length", "json_valid", "numeric_match", "regex", "iou", "choice_accuracy", "think_format",
    }
    assert isinstance(load_reward("vader"), VaderSentiment)
    assert isinstance(load_reward("json_valid"), JsonValid)
    assert isinstance(load_reward("numeric_match"), NumericAnswerMatch)
    regex = load_reward(r"regex:^\d+:\d+$")  # the pattern may itself contain colons
    torch.testing.assert_close(regex(["p", "p"], ["12:30", "noon"]), torch.tensor([1.0, 0.0]))
    assert load_reward("length:10").target == 10
    assert load_reward("length", target=7, unit="chars").unit == "chars"
    with pytest.raises(ValueError, match="target"):
        load_reward("length")


def test_load_reward_from_module_path():
    reward = load_reward("alignkit.rewards.rules:VaderSentiment")  # a class: instantiated
    assert reward(["p"], ["I love it"]).item() > 0.5
    length = load_reward("alignkit.rewards:LengthTarget", target=2)
    torch.testing.assert_close(length(["p"], ["a b c"]), torch.tensor([-0.5]))


def test_load_reward_from_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        textwrap.dedent(
            """
            def exclamations(prompts, completions):
                return [float(c.count("!")) for c in completions]

            NOT_CALLABLE = 3
            """
        )
    )
    reward = load_reward(f"{path}:exclamations")
    out = reward(["p", "q"], ["wow!!", "ok"], answer=["ignored", "ignored"])
    assert out.dtype == torch.float32  # plain function output wrapped into a tensor
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0]))
    assert reward.__name__ == "exclamations"

    with pytest.raises(ValueError, match="has no attribute 'missing'") as info:
        load_reward(f"{path}:missing")
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="not a callable"):
        load_reward(f"{path}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="does not exist"):
        load_reward(f"{tmp_path}/nope.py:f")


def test_load_reward_errors_name_the_spec():
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="unknown reward spec 'vaderr'"):
        load_reward("vaderr")
    with pytest.raises(ValueError, match="given to a function"):
        load_reward("math:sqrt", scale=2)
