"""rm_principles (SALMON): the principles block, a tiny RM that learns a principle-conditioned
rule, principles swapped at scoring time flip the ranking, `rm:DIR,principles=FILE` as a
reward, `alignkit label-principles`, and one-line errors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from persona_data import LONG, SHORT, principle_pairs, short_and_long
from reward_helpers import train_tiny
from run_helpers import write_jsonl

from alignkit.algorithms import ALGORITHMS
from alignkit.cli import main
from alignkit.lab import principle_label
from alignkit.rewards import PrincipleRewardScorer, load_reward, principled_prompt
from alignkit.rewards.principles import load_principles


@pytest.fixture(scope="module")
def principles_rm(tiny_model_dir, tmp_path_factory):
    rows = principle_pairs(160, seed=0)
    result = train_tiny("rm_principles", rows, tmp_path_factory.mktemp("rmp") / "run", model_dir=tiny_model_dir,
                        split=128, epochs=3, lr=2e-3)
    return result


def test_principled_prompt_is_one_format_for_text_and_messages():
    """Worked example: the block is 'Principles:' and one bullet per principle."""
    assert principled_prompt("Say hi.", ["Be brief.", "Be kind."]) == "Principles:\n- Be brief.\n- Be kind.\n\nSay hi."
    assert principled_prompt("Say hi.", "Be brief.") == "Principles:\nBe brief.\n\nSay hi."
    salmon = [{"dimension": "Concise", "definition": "no filler"}]
    assert principled_prompt("Q", salmon) == "Principles:\n- Concise: no filler\n\nQ"
    messages = principled_prompt([{"role": "user", "content": "Q"}], ["Be brief."])
    assert messages == [{"role": "system", "content": "Principles:\n- Be brief."}, {"role": "user", "content": "Q"}]
    merged = principled_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], ["B"])
    assert merged[0]["content"] == "Principles:\n- B\n\nS" and len(merged) == 2
    with pytest.raises(ValueError, match="empty"):
        principled_prompt("Q", [])


def test_load_principles_reads_text_and_json_forms(tmp_path):
    (tmp_path / "p.txt").write_text("Be brief.\n")
    (tmp_path / "p.json").write_text(json.dumps([{"dimension": "Honest", "definition": "say what you know"}]))
    (tmp_path / "bad.json").write_text(json.dumps([3]))
    assert load_principles(tmp_path / "p.txt") == "Be brief."
    assert load_principles(tmp_path / "p.json")[0]["dimension"] == "Honest"
    with pytest.raises(ValueError, match="bad.json.*each principle"):
        load_principles(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        load_principles(tmp_path / "missing.txt")


def test_rm_principles_is_registered_and_learns_the_principle_conditioned_rule(principles_rm):
    """Held-out pairs (both principles mixed): accuracy >= 0.9 (measured 1.0). A model that
    ignored the principles could not pass: half the held-out rows want the short answer, half
    the long one."""
    spec = ALGORITHMS["rm_principles"]
    assert spec.kind == "reward" and "principles" in spec.data
    assert principles_rm.eval_metrics["eval/rewards/accuracies"] >= 0.9
    manifest = json.loads((principles_rm.final_dir / "principles_rm.json").read_text())
    assert manifest["principle_sets_in_training"] == 2 and manifest["default_principles"] is None


def test_swapping_the_principles_at_scoring_time_flips_the_ranking(principles_rm, tmp_path):
    """The same (short, long) answers on unseen prompts: short ranks first under 'prefer short
    answers', long first under 'prefer long answers' (--reward rm:DIR,principles=FILE)."""
    short_file, long_file = tmp_path / "short.json", tmp_path / "long.txt"
    short_file.write_text(json.dumps([SHORT]))
    long_file.write_text(LONG + "\n")
    under_short = load_reward(f"rm:{principles_rm.final_dir},principles={short_file}")
    under_long = load_reward(f"rm:{principles_rm.final_dir},principles={long_file}")
    assert isinstance(under_short, PrincipleRewardScorer)
    rng = random.Random(7)
    answers = [short_and_long(rng) for _ in range(12)]
    prompts = [f"Describe it. The film {i}" for i in range(12)]
    shorts, longs = [a for a, _ in answers], [b for _, b in answers]
    short_margin = under_short(prompts, shorts) - under_short(prompts, longs)
    long_margin = under_long(prompts, shorts) - under_long(prompts, longs)
    assert (short_margin > 0).float().mean() >= 0.9
    assert (long_margin < 0).float().mean() >= 0.9
    # a per-row principles column gives the same scores as the file
    columns = under_short.__class__(principles_rm.final_dir)(prompts, shorts, principles=[[SHORT]] * 12)
    torch.testing.assert_close(columns, under_short(prompts, shorts))


def test_principles_errors_are_one_line(principles_rm, tiny_model_dir, tmp_path):
    rows = principle_pairs(8)
    del rows[3]["principles"]
    with pytest.raises(ValueError, match=r"row 4.*'principles' column"):
        train_tiny("rm_principles", rows, tmp_path / "missing", model_dir=tiny_model_dir, max_steps=1)
    rows = principle_pairs(8)
    rows[1]["principles"] = [""]
    with pytest.raises(ValueError, match=r"row 2.*non-empty string"):
        train_tiny("rm_principles", rows, tmp_path / "blank", model_dir=tiny_model_dir, max_steps=1)
    no_principles = load_reward(f"rm:{principles_rm.final_dir}")
    with pytest.raises(ValueError, match="needs principles"):
        no_principles(["Q"], [" a."])
    with pytest.raises(ValueError, match="is not one of principles=FILE"):
        load_reward(f"rm:{principles_rm.final_dir},principle=x.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_reward(f"rm:{principles_rm.final_dir},principles={tmp_path / 'nope.json'}")


def test_judge_keeps_a_pair_only_when_both_orders_agree(monkeypatch):
    """Worked example: log p(a), log p(b) per judged text, two texts (ab order, ba order) per pair.
    pair 1: d_ab = 2, d_ba = -1 -> response 1, margin 1.5; pair 2: d_ab = -1, d_ba = 3 -> 2, margin
    -2; pair 3: d_ab = 1, d_ba = 1 (the judge always says 'a': position bias) -> None."""
    table = torch.tensor([[0.0, -2.0], [-1.0, 0.0], [-1.0, 0.0], [0.0, -3.0], [0.0, -1.0], [0.0, -1.0]])
    monkeypatch.setattr(principle_label, "letter_log_probs", lambda *args: table)
    verdicts = principle_label.judge_pairs(None, None, ["q"] * 3, ["x"] * 3, ["y"] * 3, [["p"]] * 3)
    assert verdicts == [(1, 1.5), (2, -2.0), (None, 0.0)]
    text = principle_label.judge_prompt("Q?", "FIRST-ANSWER", "SECOND-ANSWER", ["Be brief."])
    assert "- Be brief." in text and text.endswith("Response (")
    assert text.index("(a)\nFIRST-ANSWER") < text.index("(b)\nSECOND-ANSWER")


def test_principle_subsets_follow_the_dominant_principle_and_negations():
    """Worked example: margins pair 0 = (2, -1), pair 1 = (0, 0). Variances over the pairs:
    A (2, 0) -> 1, B (-1, 0) -> 0.25, so normalised A = 2, B = -4. One principle per row: A gives
    response 1 (strength 2), B response 2 (strength 4); pair 1 gives no row (both orders
    disagreed under every principle). With both principles B dominates (|-4| > |2|); a negated
    principle (its negative_definition) flips the preference."""
    rows = principle_label.principle_subsets([[2.0, -1.0], [0.0, 0.0]], ["A", "B"], 20, max_principles=1)
    assert rows and all(i == 0 for i, *_ in rows)
    assert {(tuple(p), pref, strength) for _, p, pref, strength in rows} == {(("A",), 1, 2.0), (("B",), 2, 4.0)}
    both = principle_label.principle_subsets([[2.0, -1.0], [0.0, 0.0]], ["A", "B"], 50, max_principles=2)
    two = [(pref, strength) for i, p, pref, strength in both if len(p) == 2]
    assert two and all(pref == 2 and strength == 4.0 for pref, strength in two)
    dicts = [{"dimension": "Short", "definition": "be short", "negative_definition": "be long"}]
    flips = principle_label.principle_subsets([[1.0], [-1.0]], dicts, 40, seed=3)
    negated = [(i, pref) for i, p, pref, _ in flips if p[0]["definition"] == "be long"]
    plain = [(i, pref) for i, p, pref, _ in flips if p[0]["definition"] == "be short"]
    assert negated and plain
    assert all(pref == (2 if i == 0 else 1) for i, pref in negated)
    assert all(pref == (1 if i == 0 else 2) for i, pref in plain)


def test_label_principles_writes_pairs_that_rm_principles_trains_on(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Describe the film {i}."} for i in range(6)])
    principles = tmp_path / "principles.json"
    principles.write_text(json.dumps([{"dimension": "Concise", "definition": "short answers"},
                                      {"dimension": "Detailed", "definition": "long answers"}]))
    out = tmp_path / "pairs.jsonl"
    args = ["label-principles", "--prompts", prompts, "--model", str(tiny_model_dir), "--principles", str(principles),
            "--out", str(out), "--max-new-tokens", "8", "--per-principle", "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "pairs.manifest.json").read_text())
    counts = manifest["counts"]
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["judged"] == 2 * (6 - counts["unusable_samples"])
    assert counts["pairs"] == len(pairs) == counts["judged"] - counts["inconsistent"]
    for pair in pairs:
        assert len(pair["principles"]) == 1 and pair["chosen"] != pair["rejected"] and pair["margin"] >= 0
    # a judge with no position bias (prefers the shorter response in either order): every pair
    # is kept, chosen = the shorter, and rm_principles trains on the file as written
    def shorter_is_better(model, tokenizer, texts, batch_size):
        def lengths(text):
            a = text.split("### Response (a)\n")[1].split("\n\n### Response (b)")[0]
            b = text.split("### Response (b)\n")[1].split("\n\nThe response")[0]
            return len(a), len(b)
        return torch.tensor([[0.0, -1.0] if la < lb else [-1.0, 0.0] for la, lb in map(lengths, texts)])

    monkeypatch.setattr(principle_label, "letter_log_probs", shorter_is_better)
    assert main(args) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    counts = json.loads((tmp_path / "pairs.manifest.json").read_text())["counts"]
    assert len(pairs) == counts["judged"] - counts["inconsistent"] >= 8  # equal lengths stay inconsistent
    assert all(len(p["chosen"]) < len(p["rejected"]) for p in pairs)
    assert {p["principles"][0]["dimension"] for p in pairs} == {"Concise", "Detailed"}
    result = train_tiny("rm_principles", pairs, tmp_path / "rm", model_dir=tiny_model_dir, max_steps=1)
    assert (result.final_dir / "principles_rm.json").is_file()
    assert main([*args[:-2], "--principle-subsets", "3", "--no-progress"]) == 0  # SALMON's RM data
    subsets = [json.loads(line) for line in out.read_text().splitlines()]
    assert 8 <= len(subsets) <= 3 * 6 and all(1 <= len(p["principles"]) <= 2 for p in subsets)
    assert all(len(p["chosen"]) < len(p["rejected"]) for p in subsets)
    assert main(["label-principles", "--prompts", prompts, "--model", str(tiny_model_dir), "--principles",
                 str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "principles file" in capsys.readouterr().err


def test_principles_reach_online_training_and_eval_rm(principles_rm, tiny_model_dir, tmp_path):
    """GRPO with --reward rm:DIR and --set principles=FILE scores every sample (finite rewards);
    --set principles without such a reward is refused; eval-rm --principles evaluates under them."""
    from reward_helpers import eval_rm
    from run_helpers import read_metrics
    from test_online import ROWS

    import alignkit

    principles = tmp_path / "short.json"
    principles.write_text(json.dumps([SHORT]))
    common = dict(model=str(tiny_model_dir), data=ROWS, batch_size=2, max_steps=2, group_size=2, max_new_tokens=4,
                  progress=False, allow_degenerate=True)
    alignkit.train("grpo", output_dir=tmp_path / "run", reward=f"rm:{principles_rm.final_dir}",
                   principles=str(principles), **common)
    assert all(math.isfinite(r["reward/mean"]) for r in read_metrics(tmp_path / "run"))
    with pytest.raises(ValueError, match="principles=.* is for an rm_principles reward model"):
        alignkit.train("grpo", output_dir=tmp_path / "bad", reward="length:4", principles=str(principles), **common)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [r for r in principle_pairs(40, seed=3) if r["principles"] == [SHORT]])
    results = eval_rm(principles_rm.final_dir, pairs, tmp_path / "eval.json", 50, "--principles", str(principles))
    assert results["kind"] == "principles_rm" and results["accuracy"] >= 0.9


def test_one_principle_set_in_training_is_the_default_at_scoring_time(tiny_model_dir, tmp_path):
    """Trained under SHORT only (held-out rows under LONG do not count): principles_rm.json keeps
    SHORT, and rm:DIR without principles scores exactly as rm:DIR,principles=FILE with SHORT."""
    rows = [r for r in principle_pairs(40, seed=2) if r["principles"] == [SHORT]]
    held_out = [r for r in principle_pairs(20, seed=4) if r["principles"] == [LONG]]
    result = train_tiny("rm_principles", rows + held_out, tmp_path / "one", model_dir=tiny_model_dir,
                        split=len(rows), max_steps=2)
    manifest = json.loads((result.final_dir / "principles_rm.json").read_text())
    assert manifest["default_principles"] == [SHORT] and manifest["principle_sets_in_training"] == 1
    short = tmp_path / "short.json"
    short.write_text(json.dumps([SHORT]))
    default, explicit = load_reward(f"rm:{result.final_dir}"), load_reward(f"rm:{result.final_dir},principles={short}")
    prompts, answers = ["Describe it. The film"] * 2, [" good.", " good and great and happy."]
    torch.testing.assert_close(default(prompts, answers), explicit(prompts, answers))


def test_personal_options_leave_other_specs_alone():
    """A regex with a comma is not parsed as rm:DIR,key=FILE options, with or without the setting."""
    from alignkit.training.online.build import load_reward_spec
    from alignkit.training.online.presets import OnlineSettings

    for settings in (OnlineSettings(), OnlineSettings(principles="p.json")):
        reward = load_reward_spec("regex:a{1,2}", settings)
        assert reward(["q"], ["aa"]).tolist() == [1.0]
