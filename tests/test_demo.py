"""The demo pipeline at CI size on a tiny model: every step runs and the files follow the schema.
(The full demo on SmolLM2 runs with `make demo`; its numbers go in the issue notes.)"""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from alignkit.demo import DemoOptions, build_pairs, load_prompts, run_demo
from alignkit.rewards import VaderSentiment


def test_prompt_set_is_split_into_train_and_heldout():
    prompts = load_prompts()
    assert len(prompts["train"]) >= 100 and len(prompts["heldout"]) >= 20
    assert not set(prompts["train"]) & set(prompts["heldout"])


def test_build_pairs_takes_best_and_worst_and_counts_ties():
    prompts = ["p1", "p2"]
    groups = [["It was awful.", "It was wonderful!", "It was fine."], ["Okay.", "Okay."]]
    pairs, ties = build_pairs(prompts, groups, VaderSentiment())
    assert ties == 1 and len(pairs) == 1
    assert pairs[0]["chosen"][0]["content"] == "It was wonderful!"
    assert pairs[0]["rejected"][0]["content"] == "It was awful."


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    options = DemoOptions(
        output=str(tmp_path / "demo"), model=str(tiny_model_dir), train_prompts=8, samples_per_prompt=2,
        eval_prompts=3, eval_samples=2, max_new_tokens=6, epochs=1, batch_size=4, progress=False,
    )
    results = run_demo(options)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["methods"].keys() == {"base", "dpo"}
    for method in saved["methods"].values():
        assert method["ci_low"] <= method["gold_reward"] <= method["ci_high"]
        assert method["n"] == 6 and len(method["samples"]) == 2
    assert set(saved["stage_seconds"]) == {"load", "score_base", "sample_pairs", "train_dpo", "score_dpo"}
    assert isinstance(saved["improved_with_separated_intervals"], bool)
    assert results["pairs"] + results["pairs_left_out"] == 8
    AutoModelForCausalLM.from_pretrained(saved["dpo_final"])
