"""LLM judges as rewards (alignkit/rewards/judge.py): worked examples on a scripted judge LM whose
answer probabilities are set by hand, order symmetry and ties on the real tiny model, the
`judge:` spec and its one-line errors, and a judge reward driving GRPO."""

from __future__ import annotations

import math

import pytest
import torch
from judge_helpers import pairwise_responses, pointwise_response, scripted_judge
from run_helpers import read_metrics
from torch.testing import assert_close

import alignkit
from alignkit.rewards import load_reward
from alignkit.rewards.judge import (
    LLMJudge,
    parse_judge_spec,
    symmetric_preference,
    two_way_probability,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_two_way_probability_and_symmetric_preference_worked_example():
    """log-probs (ln 0.6, ln 0.2 | ln 0.1 ...): P(first) = 0.6 / (0.6 + 0.2) = 0.75.
    q(a, b) = 0.9, q(b, a) = 0.3: soft (0.9 + 1 - 0.3) / 2 = 0.8; hard votes 1 and 1 -> 1.
    q = 0.8 both ways (pure position bias): soft 0.5; hard votes 1 and 0 -> 0.5, the tie."""
    logprobs = torch.log(torch.tensor([[0.6, 0.2, 0.1, 0.1]]))
    assert_close(two_way_probability(logprobs, [0], [1]), torch.tensor([0.75]))
    assert_close(two_way_probability(logprobs, [0, 2], [1]), torch.tensor([0.7 / 0.9]))
    forward, backward = torch.tensor([0.9, 0.8, 0.5]), torch.tensor([0.3, 0.8, 0.5])
    assert_close(symmetric_preference(forward, backward), torch.tensor([0.8, 0.5, 0.5]))
    assert_close(symmetric_preference(forward, backward, "hard"), torch.tensor([1.0, 0.5, 0.5]))


def test_pointwise_judge_reads_yes_against_no(tokenizer):
    """gap = logit(Yes) - logit(No) = ln 3 for "great", -ln 3 otherwise:
    P(Yes) = 3 / (3 + 1) = 0.75 and 1 / (1 + 3) = 0.25."""
    judge = scripted_judge(tokenizer, lambda text: math.log(3) * (1 if pointwise_response(text) == "great" else -1))
    scores = judge(["Review it.", "Review it."], ["great", "awful"])
    assert_close(scores, torch.tensor([0.75, 0.25]))


def test_pairwise_judge_asks_both_orders_and_cancels_position_bias(tokenizer):
    """gap = s(shown first) - s(shown second) + ln 2 (a bias towards output 0), s(great) = ln 4.5,
    s(bad) = 0: q(great, bad) = sigma(ln 9) = 0.9, q(bad, great) = sigma(ln(4/9)) = 4/13, so
    P(great > bad) = (0.9 + 1 - 4/13) / 2 = (0.9 + 9/13) / 2 and P(bad > great) = 1 - that."""
    values = {"great": math.log(4.5), "bad": 0.0}

    def gap(text):
        first, second = pairwise_responses(text)
        return values[first] - values[second] + math.log(2)

    judge = scripted_judge(tokenizer, gap, mode="pairwise")
    expected = (0.9 + 9 / 13) / 2
    assert_close(judge.prefer(["p", "p"], ["great", "bad"], ["bad", "great"]), torch.tensor([expected, 1 - expected]))
    hard = scripted_judge(tokenizer, gap, mode="pairwise", decision="hard")
    assert_close(hard.prefer(["p"], ["great"], ["bad"]), torch.tensor([1.0]))


def test_pure_position_bias_is_a_tie_counted_half(tokenizer):
    """A judge that always answers "0" with probability 0.8 (gap ln 4) prefers whatever is shown
    first: soft and hard both give exactly 0.5 in every pair."""
    for decision in ("soft", "hard"):
        judge = scripted_judge(tokenizer, lambda text: math.log(4), mode="pairwise", decision=decision)
        assert_close(judge.prefer(["p", "q"], ["a", "b"], ["c", "d"]), torch.tensor([0.5, 0.5]))


def test_group_win_rates_against_the_other_completions_of_each_prompt(tokenizer):
    """s(great) = ln 9, s(good) = ln 3, s(bad) = 0, no bias: P(great > good) = sigma(ln 3) = 0.75,
    P(great > bad) = 0.9, P(good > bad) = 0.75. Win rates: great (0.75 + 0.9) / 2 = 0.825,
    good (0.25 + 0.75) / 2 = 0.5, bad (0.1 + 0.25) / 2 = 0.175. Rows of another prompt,
    interleaved, are their own group: 0.75 and 0.25."""
    values = {"great": math.log(9), "good": math.log(3), "bad": 0.0}

    def gap(text):
        first, second = pairwise_responses(text)
        return values[first] - values[second]

    judge = scripted_judge(tokenizer, gap, mode="pairwise")
    prompts = ["p", "q", "p", "q", "p"]
    scores = judge(prompts, ["great", "good", "good", "bad", "bad"])
    assert_close(scores, torch.tensor([0.825, 0.75, 0.5, 0.25, 0.175]))
    assert judge.model.calls == 1  # 3 x 2 + 2 x 1 = 8 ordered pairs in one batched forward


def test_pairwise_against_a_reference_column(tokenizer):
    """With reference_column=chosen each completion is judged against its row's reference:
    P(great > bad) = 0.9 (no bias, s(great) - s(bad) = ln 9) and P(bad > great) = 0.1."""
    values = {"great": math.log(9), "bad": 0.0}

    def gap(text):
        first, second = pairwise_responses(text)
        return values[first] - values[second]

    judge = scripted_judge(tokenizer, gap, mode="pairwise", reference_column="chosen")
    scores = judge(["p", "p"], ["great", "bad"], chosen=["bad", "great"])
    assert_close(scores, torch.tensor([0.9, 0.1]))
    with pytest.raises(ValueError, match="reference_column 'chosen' is not a column"):
        judge(["p"], ["great"])


def test_real_tiny_judge_through_the_spec_is_order_symmetric(tiny_model_dir):
    """`judge:DIR` loads the tiny causal LM: pointwise scores lie in (0, 1); pairwise win rates
    of a two-sample group sum to exactly 1 (each pair asked in both orders)."""
    pointwise = load_reward(f"judge:{tiny_model_dir}")
    scores = pointwise(["Write a review."] * 2, ["great movie", "awful"])
    assert scores.shape == (2,) and bool(((scores > 0) & (scores < 1)).all())
    pairwise = load_reward(f"judge:{tiny_model_dir},mode=pairwise,batch_size=3")
    rates = pairwise(["Tell me", "Tell me", "The movie", "The movie"], ["yes", "no no", "good", "bad bad bad"])
    assert_close(rates[0] + rates[1], torch.tensor(1.0))
    assert_close(rates[2] + rates[3], torch.tensor(1.0))
    hard = load_reward(f"judge:{tiny_model_dir},mode=pairwise,decision=hard")
    assert set(hard(["a", "a"], ["x", "y"]).tolist()) <= {0.0, 0.5, 1.0}


def test_bad_judge_specs_and_inputs_fail_in_one_line(tiny_model_dir, tokenizer, tmp_path):
    assert parse_judge_spec("judge:m,mode=pairwise,batch_size=4") == ("m", {"mode": "pairwise", "batch_size": 4})
    cases = [
        ("judge:", "write the judge model after judge:"),
        ("judge:m,colour=red", "judge options are key=value"),
        ("judge:m,batch_size=many", "batch_size must be an integer"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            load_reward(spec)
    model = scripted_judge(tokenizer, lambda text: 0.0).model
    with pytest.raises(ValueError, match="judge mode must be one of"):
        LLMJudge(model, tokenizer, mode="listwise")
    with pytest.raises(ValueError, match="needs mode=pairwise"):
        LLMJudge(model, tokenizer, reference_column="chosen")
    with pytest.raises(ValueError, match="does not exist"):
        LLMJudge(model, tokenizer, template=str(tmp_path / "missing.txt"))
    template = tmp_path / "t.txt"
    template.write_text("Rate {prompt} only")
    with pytest.raises(ValueError, match=r"uses the fields \{prompt\}, \{response\} once each"):
        LLMJudge(model, tokenizer, template=str(template))
    pairwise = LLMJudge(model, tokenizer, mode="pairwise")
    with pytest.raises(ValueError, match="has one completion in this batch"):
        pairwise(["only once", "p", "p"], ["a", "b", "c"])


def test_custom_template_file_is_used(tokenizer, tmp_path):
    """A template file with {prompt} and {response}: the scripted judge sees its text."""
    template = tmp_path / "judge.txt"
    template.write_text("Q: {prompt}\nA: {response}\nGood?")
    seen = []
    judge = scripted_judge(tokenizer, lambda text: seen.append(text) or 0.0, template=str(template))
    assert_close(judge(["two plus two"], ["4"]), torch.tensor([0.5]))
    assert "Q: two plus two\nA: 4\nGood?" in seen[0]


def test_plain_text_judge_input_without_a_chat_template(tokenizer):
    """A tokenizer without a chat template: the filled template is plain text ending in "Answer:"."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    seen = []
    judge = scripted_judge(plain, lambda text: seen.append(text) or math.log(3))
    assert_close(judge(["p"], ["r"]), torch.tensor([0.75]))
    assert seen[0].rstrip().endswith("Yes or No.\nAnswer:") and "<|im_start|>" not in seen[0]


ROWS = [{"prompt": p} for p in ["Write a short review.", "The movie", "Tell me", "What is two plus two?"] * 4]


def test_judge_spec_drives_grpo_two_steps(tiny_model_dir, tmp_path):
    """`--reward judge:DIR` in a GRPO run: two steps, rewards are probabilities; pairwise too."""
    alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "run",
                   reward=f"judge:{tiny_model_dir}", max_steps=2, batch_size=2, group_size=2, max_new_tokens=6,
                   progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 < r["reward/mean"] < 1.0 for r in rows)
    # pairwise: each completion's win rate within its prompt's group; a group's rates average 1/2
    alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "pairwise",
                   reward=f"judge:{tiny_model_dir},mode=pairwise", max_steps=2, batch_size=2, group_size=3,
                   max_new_tokens=6, progress=False, allow_degenerate=True)
    rows = read_metrics(tmp_path / "pairwise")
    assert all(r["reward/mean"] == pytest.approx(0.5, abs=1e-6) for r in rows)


def test_judge_reward_teaches_grpo_the_judges_taste(tiny_model_dir, tokenizer, tmp_path):
    """A judge whose P(Yes) = sigma(#e - 2) in the response: GRPO raises the judged reward by
    more than 0.2 (the untrained tiny model scores ~0.15)."""
    judge = scripted_judge(tokenizer, lambda text: pointwise_response(text).count("e") - 2.0)
    alignkit.train("grpo", model=str(tiny_model_dir), data=ROWS, output_dir=tmp_path / "learn", reward=judge,
                   max_steps=30, batch_size=4, group_size=4, max_new_tokens=8, lr=1e-2, warmup_ratio=0.0,
                   scheduler="constant", progress=False)
    rows = read_metrics(tmp_path / "learn")
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.2, (first, last)


def test_alignkit_eval_scores_with_judges(tiny_model_dir, tmp_path):
    """`alignkit eval --reward judge:DIR --judge judge:DIR,mode=pairwise`: the gold reward is the
    pointwise P(Yes) (a probability), the win rate comes from the pairwise judge; the policy is
    its own reference, so every pair is the same text and the win rate is exactly 0.5."""
    import json

    from alignkit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Write a short review.", "Tell me"]))
    code = main(["eval", "--model", str(tiny_model_dir), "--ref", str(tiny_model_dir), "--prompts", str(prompts),
                 "--reward", f"judge:{tiny_model_dir}", "--judge", f"judge:{tiny_model_dir},mode=pairwise",
                 "--samples", "2", "--max-new-tokens", "6", "--no-embeddings", "--no-progress",
                 "--output", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert 0.0 < result["gold_reward"] < 1.0
    assert result["win_rate"] == 0.5
    assert result["win_rate_details"]["judge"] == "PairwiseLLMJudge"
