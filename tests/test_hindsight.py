"""RLHS's hindsight-simulation reward (alignkit/agents/hindsight.py) and `alignkit label`: the
reward is a function of its inputs and the seed, the judge scores exactly prompt + response +
the simulated consequence, P(yes) is the hand-computed sigmoid of a logit difference, and
`--reward rlhs:cfg.yaml` works in online GRPO and in `label`, whose pairs `train dpo` takes."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import read_metrics, write_jsonl
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.agents.hindsight import HindsightReward, render_conversation, row_seed
from alignkit.agents.hindsight_config import HindsightConfig, load_config
from alignkit.agents.reward_specs import load_reward
from alignkit.cli import main as cli_main
from alignkit.data import detect_kind, load_rows
from alignkit.lab.label import LabelOptions, choose_pair, run_label

PREFIX = "\n\nThe user acted on the assistant's answer. What happened next:"
PROMPTS = ["Tell me", "The movie", "What is two plus two?"]
RESPONSES = ["The film was great.", "awful", "The answer is 4."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def crc_judge(prompts, completions, **columns):
    """A planted judge: a checksum of exactly (prompt, completion), so equal scores mean the
    judge saw exactly that text (< 2**16: exact in float32)."""
    return [float(zlib.crc32(f"{p}\x00{c}".encode()) % 65536) for p, c in zip(prompts, completions, strict=True)]


def reward_for(model_dir, **settings) -> HindsightReward:
    base = dict(simulator=str(model_dir), yes="y", no="n", horizon=6, device="cpu")
    return HindsightReward(HindsightConfig(**{**base, **settings}))


def write_config(path: Path, **settings) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_sampled_rewards_repeat_under_a_seed_and_ignore_the_batch(tiny_model_dir):
    """Two separately built rewards, sampling at temperature 1 with 2 simulations: the same
    rewards and consequences; each row alone scores what it scores inside the batch; another
    seed draws other consequences."""
    first = reward_for(tiny_model_dir, n_simulations=2).score(PROMPTS, RESPONSES)
    again = reward_for(tiny_model_dir, n_simulations=2).score(PROMPTS, RESPONSES)
    assert first.consequences == again.consequences and len(first.consequences[0]) == 2
    assert_close(first.hindsight, again.hindsight, rtol=0, atol=0)
    alone = reward_for(tiny_model_dir, n_simulations=2).score(PROMPTS[1:2], RESPONSES[1:2])
    assert alone.consequences[0] == first.consequences[1]
    assert_close(alone.hindsight[0], first.hindsight[1], rtol=0, atol=0)
    other = reward_for(tiny_model_dir, n_simulations=2, seed=1).score(PROMPTS, RESPONSES)
    assert other.consequences != first.consequences
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(1, "a")


def test_judge_scores_exactly_prompt_response_and_simulation(tiny_model_dir):
    """Greedy simulation, predicted independently with transformers' generate on the simulator
    input "User: x\\nAssistant: y" + PREFIX; the reward equals the planted judge's score of
    (x, y + PREFIX + that continuation), and the foresight score its score of (x, y)."""
    reward = reward_for(tiny_model_dir, judge=f"{__file__}:crc_judge", temperature=0.0, foresight=True)
    scores = reward.score(PROMPTS, RESPONSES)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        ids = tokenizer(f"User: {prompt}\nAssistant: {response}" + PREFIX, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        consequence = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        expected.append(response + PREFIX + consequence)
    assert [row[0] for row in scores.consequences] == [text.split(PREFIX)[1] for text in expected]
    assert_close(scores.hindsight, torch.tensor(crc_judge(PROMPTS, expected)), rtol=0, atol=0)
    assert_close(scores.foresight, torch.tensor(crc_judge(PROMPTS, RESPONSES)), rtol=0, atol=0)
    logged = (reward(PROMPTS, RESPONSES), reward.drain())[1]
    assert_close(logged["rlhs/hindsight"], scores.hindsight) and reward.drain() == {}


def test_yes_no_judge_is_p_yes_over_yes_and_no_from_the_logits(tiny_model_dir):
    """P(yes) = e^z_y / (e^z_y + e^z_n), z the simulator's next-token logits after
    "User: x\\nAssistant: y" + PREFIX + consequence + "\\n\\nQuestion: Q\\nAnswer:", one row at a
    time by hand; the reward scores the rows batched (left-padded: batch_independent off)."""
    question = "Was the user satisfied with the outcome? Answer yes or no."
    for independent in (True, False):
        reward = reward_for(tiny_model_dir, temperature=0.0, batch_independent=independent)
        scores = reward.score(PROMPTS, RESPONSES)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        yes, no = tokenizer.convert_tokens_to_ids(["y", "n"])
        by_hand = []
        for prompt, response, (consequence,) in zip(PROMPTS, RESPONSES, scores.consequences, strict=True):
            text = f"User: {prompt}\nAssistant: {response}{PREFIX}{consequence}\n\nQuestion: {question}\nAnswer:"
            with torch.no_grad():
                z = model(**tokenizer(text, return_tensors="pt")).logits[0, -1]
            by_hand.append((z[yes].exp() / (z[yes].exp() + z[no].exp())).item())
        assert_close(scores.hindsight, torch.tensor(by_hand), rtol=1e-5, atol=1e-6)


def test_facts_reach_the_simulator_not_the_judge(tiny_model_dir):
    reward = reward_for(tiny_model_dir, judge=f"{__file__}:crc_judge", temperature=0.0, facts_column="facts")
    text = reward.simulation_input("Is it safe?", "Yes.", "the bridge is closed")
    assert text == "Facts the user did not know: the bridge is closed\n\nUser: Is it safe?\nAssistant: Yes." + PREFIX
    scores = reward.score(["Is it safe?"], ["Yes."], facts=["the bridge is closed"])
    assert_close(scores.hindsight, torch.tensor(crc_judge(["Is it safe?"], ["Yes." + PREFIX + scores.consequences[0][0]])))
    with pytest.raises(ValueError, match="facts_column 'facts': the batch has no such column"):
        reward.score(["Is it safe?"], ["Yes."])
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_conversation(conversation, "Hello") == "System: Be brief.\nUser: Hi\nAssistant: Hello"


@pytest.mark.parametrize(("settings", "message"), [
    ("- a list", "must be a mapping of settings"),
    ({"judge": "vader"}, "'simulator' is required"),
    ({"simulator": "M", "horizn": 8}, "unknown key 'horizn'"),
    ({"simulator": "M", "horizon": 0}, "horizon must be >= 1, got 0"),
    ({"simulator": "M", "horizon": "ten"}, "horizon must be int, got 'ten'"),
    ({"simulator": "M", "foresight": "yes"}, "foresight must be bool"),
    ({"simulator": "M", "template": "{conversation} {answer}"}, r"unknown field \{answer\}"),
    ({"simulator": "M", "temperature": 0, "n_simulations": 2}, "repeats one greedy simulation"),
    ({"simulator": "M", "template": "{facts} {conversation}"}, "name the dataset column"),
    ({"simulator": "M", "judge": "rlhs:other.yaml"}, "cannot judge another one"),
])
def test_bad_configs_are_one_line_errors_naming_the_file(settings, message, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(settings if isinstance(settings, str) else yaml.safe_dump(settings))
    with pytest.raises(ValueError, match=message) as caught:
        load_reward(f"rlhs:{path}")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_bad_configs_found_with_the_model(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_reward(f"rlhs:{tmp_path / 'missing.yaml'}")
    multi = write_config(tmp_path / "a.yaml", simulator=str(tiny_model_dir), yes=" yes", no="n")
    with pytest.raises(ValueError, match=r"yes answer ' yes' is 3 tokens.*a.yaml|a.yaml.*yes answer ' yes' is 3"):
        load_reward(f"rlhs:{multi}")
    judge = write_config(tmp_path / "b.yaml", simulator=str(tiny_model_dir), judge="nope.py:fn")
    with pytest.raises(ValueError, match="b.yaml.*nope.py.*does not exist"):
        load_reward(f"rlhs:{judge}")
    with pytest.raises(ValueError, match="do not apply to an rlhs reward"):
        load_reward(f"rlhs:{judge}", aggregation="mean")
    assert load_config(write_config(tmp_path / "c.yaml", simulator="M", facts_column="f")).template.startswith("Facts")


def test_grpo_trains_on_an_rlhs_reward_from_the_cli(tiny_model_dir, tmp_path):
    """Two GRPO steps with --reward rlhs:cfg.yaml; the hindsight and foresight means are logged."""
    config = write_config(tmp_path / "rlhs.yaml", simulator=str(tiny_model_dir), yes="y", no="n", horizon=4,
                          foresight=True, device="cpu")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "grpo"
    code = cli_main(["train", "grpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(out),
                     "--reward", f"rlhs:{config}", "--batch-size", "2", "--max-steps", "2", "--set", "group_size=2",
                     "--set", "max_new_tokens=4", "--no-progress"])
    assert code == 0
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert 0 < row["reward/rlhs/foresight"] < 1
        assert row["reward/rlhs/hindsight"] == pytest.approx(row["reward/mean"], abs=1e-6)


def test_choose_pair_worked_examples():
    assert choose_pair([0.1, 0.9, 0.5], ["a", "b", "c"]) == (1, 0)
    assert choose_pair([0.9, 0.9, 0.1, 0.1], ["a", "b", "c", "d"]) == (0, 2)  # first of equals
    assert choose_pair([0.5, 0.5], ["a", "b"]) == "ties"
    assert choose_pair([0.5, 0.52], ["a", "b"], tie_tolerance=0.05) == "ties"
    assert choose_pair([0.0, 9.0, 1.0], ["a", " ", "c"]) == (2, 0)  # blank responses never pair
    assert choose_pair([1.0, 2.0], ["", "b"]) == "too_few_samples"
    assert choose_pair([1.0, 2.0], ["same", "same"]) == "identical_texts"


def tie_or_length(prompts, completions, **columns):
    """Prompts mentioning "tie": 0 for every response (always a tie); else the length."""
    return [0.0 if "tie" in p else float(len(c)) for p, c in zip(prompts, completions, strict=True)]


def test_label_counts_ties_and_writes_a_manifest(tiny_model_dir, tmp_path):
    prompts = ["tie one", "tie two", "Tell me", "The movie", "Write a short review.", "What is two plus two?"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    manifest = run_label(LabelOptions(prompts=data, model=str(tiny_model_dir), reward=f"{__file__}:tie_or_length",
                                      out=str(tmp_path / "pairs.jsonl"), n=4, max_new_tokens=8, no_progress=True))
    counts = manifest["counts"]
    assert counts["ties"] >= 2 and counts["prompts"] == 6
    assert counts["pairs"] + counts["ties"] + counts["too_few_samples"] + counts["identical_texts"] == 6
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == counts["pairs"] > 0 and not any("tie" in pair["prompt"] for pair in pairs)
    for pair in pairs:
        assert pair["score_chosen"] == len(pair["chosen"]) > pair["score_rejected"] == len(pair["rejected"])
    assert json.loads((tmp_path / "pairs.manifest.json").read_text()) == manifest


def test_label_with_rlhs_then_dpo_trains_on_the_pairs(tiny_model_dir, tmp_path, capsys):
    config = write_config(tmp_path / "rlhs.yaml", simulator=str(tiny_model_dir), yes="y", no="n", horizon=4,
                          foresight=True, device="cpu")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 2])
    pairs = tmp_path / "labelled" / "pairs.jsonl"
    assert cli_main(["label", "--prompts", data, "--model", str(tiny_model_dir), "--reward", f"rlhs:{config}",
                     "--n", "3", "--max-new-tokens", "6", "--out", str(pairs), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pairs from 6 prompts x 3 responses; skipped: 0 ties" in printed and "rlhs/foresight: mean" in printed
    manifest = json.loads((pairs.parent / "pairs.manifest.json").read_text())
    assert manifest["counts"]["pairs"] == 6 and set(manifest["reward_logged"]) == {"rlhs/hindsight", "rlhs/foresight"}
    assert detect_kind(load_rows(str(pairs))) == "pairwise"
    out = tmp_path / "dpo"
    assert cli_main(["train", "dpo", "--model", str(tiny_model_dir), "--data", str(pairs), "--output", str(out),
                     "--batch-size", "2", "--max-steps", "2", "--no-progress"]) == 0
    assert [row["step"] for row in read_metrics(out)] == [1, 2]


def test_label_bad_flags_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Tell me"}])
    base = ["label", "--prompts", data, "--model", str(tiny_model_dir), "--reward", "length:4"]
    assert cli_main([*base, "--n", "1", "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "--n must be >= 2" in capsys.readouterr().err
    assert cli_main([*base, "--out", str(tmp_path / "p.json")]) == 2
    assert "write the pairs to a .jsonl file" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    assert cli_main(["label", "--prompts", bad, "--model", str(tiny_model_dir), "--reward", "length:4",
                     "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "row 2" in capsys.readouterr().err
