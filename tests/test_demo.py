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
    out = tmp_path / "demo"
    options = DemoOptions(
        output=str(out), model=str(tiny_model_dir), train_prompts=8, eval_prompts=3, eval_samples=2,
        max_new_tokens=6, grpo_steps=2, grpo_prompts_per_step=4, grpo_group_size=2, dpo_samples_per_prompt=2,
        dpo_epochs=1, dpo_batch_size=4, progress=False,
    )
    results = run_demo(options)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["base", "grpo", "dpo"]
    for name, method in saved["methods"].items():
        assert method["ci_low"] <= method["gold_reward"] <= method["ci_high"]
        assert method["n"] == 6 and len(method["samples"]) == 2
        assert {"mean_length_words", "diversity", "kl", "win_rate"} <= set(method)
        if name != "base":
            assert method["kl"] is not None and 0.0 <= method["win_rate"] <= 1.0
            assert method["curve"], name
            AutoModelForCausalLM.from_pretrained(method["final"])
            assert (out / name / "final" / "model.safetensors").exists()
    assert set(saved["stage_seconds"]) == {"load", "eval_base", "train_grpo", "eval_grpo", "train_dpo", "eval_dpo"}
    assert set(saved["beats_base_with_separated_intervals"]) == {"grpo", "dpo"}
    for name in ("report.html", "reward_bars.png", "reward_vs_kl.png"):
        assert (out / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert "grpo" in html and "dpo" in html
    extras = results["extras"]["dpo"]
    assert extras["pairs"] + extras["pairs_left_out"] == 8
