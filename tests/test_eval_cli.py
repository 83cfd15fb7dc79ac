"""`alignkit eval` and `alignkit overopt` end to end on the tiny model, and evaluate_model."""

import json

import pytest
import torch

from alignkit.cli import main

EVAL_KEYS = {
    "gold_reward",
    "ci_low",
    "ci_high",
    "gold_reward_std",
    "kl",
    "kl_k3",
    "kl_ci_low",
    "kl_ci_high",
    "kl_estimator",
    "mean_length_words",
    "mean_length_tokens",
    "median_length_tokens",
    "truncated_fraction",
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "lc_win_rate",
    "win_rate_details",
    "diversity",
    "reference_metrics",
    "reward_diff_vs_reference",
    "samples",
    "n",
    "prompts",
    "samples_per_prompt",
    "model",
    "reference",
    "settings",
}


def test_alignkit_eval_writes_eval_json(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "Write a short review of the movie."},
        {"prompt": [{"role": "user", "content": "What is two plus two?"}]},
        {"prompt": "I loved the story"},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--ref",
            str(tiny_model_dir),
            "--prompts",
            str(prompts),
            "--reward",
            "length:4",
            "--samples",
            "3",
            "--max-new-tokens",
            "8",
            "--no-embeddings",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert EVAL_KEYS <= set(result)
    assert result["n"] == 9 and result["prompts"] == 3
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert result["win_rate"] == 0.5  # same model, same seed: identical samples, all ties
    assert set(result["diversity"]) == {"per_input", "across_input"}
    assert result["win_rate_details"]["length_controlled"]["method"] == "logistic"
    assert "gold reward [95% CI]" in capsys.readouterr().out


def test_evaluate_model_kl_against_disabled_adapter(tiny_model_dir):
    from alignkit.lab import evaluate_model
    from alignkit.models import apply_lora, load_model
    from alignkit.rewards import load_reward

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)  # LoRA's A and the B drawn below: not whatever the tests before left in the RNG
    model = apply_lora(model, r=2)
    kwargs = dict(reward=load_reward("length:3"), samples=2, max_new_tokens=6, embedder=None)
    fresh = evaluate_model(model, tokenizer, ["Write a review.", "Answer briefly."], **kwargs)
    assert fresh["reference"] == "base (adapter disabled)"
    assert fresh["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: LoRA policy == base
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # std 3: the sampled k1 estimate of 2 x 6 tokens was >= 0.07 over
                param.normal_(0, 3.0)  # seeds 0-4 (with std 0.5 it went negative on 4 of 5)
    moved = evaluate_model(model, tokenizer, ["Write a review.", "Answer briefly."], **kwargs)
    assert moved["kl"] > 0.01 and moved["kl_k3"] > 0.0
    assert moved["reference_metrics"]["gold_reward"] is not None
    # pre-generated completions: nothing sampled, reward computed on the given texts
    given = evaluate_model(
        None,
        tokenizer,
        ["a", "b"],
        completions=[["x y z", "x"], ["x y", "x y z"]],
        reference=None,
        **kwargs,
    )
    assert (
        given["gold_reward"] == pytest.approx((0 - 2 / 3 - 1 / 3 + 0) / 4) and given["kl"] is None
    )


def _training_run(tmp_path, tiny_model_dir, steps):
    """A fake LoRA run: config.yaml, metrics.jsonl and step checkpoints with trainable weights."""
    from safetensors.torch import save_file

    from alignkit.models import apply_lora, load_model

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\nlora_r: 2\nlora_alpha: 4\n")
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 0.0}) for s in steps)
    )
    model, _ = load_model(str(tiny_model_dir), device="cpu")
    model = apply_lora(model, r=2, alpha=4)
    paths = []
    for step in steps:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.05 * step)
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        path = run / "checkpoints" / f"step-{step:06d}"
        path.mkdir()
        save_file(state, str(path / "weights.safetensors"))
        paths.append(str(path))
    return paths


def test_alignkit_overopt_on_tiny_model_with_checkpoints(tiny_model_dir, tmp_path):
    checkpoints = _training_run(tmp_path, tiny_model_dir, steps=(2, 4))
    out = tmp_path / "overopt"
    code = main(
        [
            "overopt",
            "--proxy",
            "vader_prefix:2",
            "--gold",
            "length:3",
            "--model",
            str(tiny_model_dir),
            "--num-prompts",
            "3",
            "--n-max",
            "5",
            "--max-new-tokens",
            "6",
            "--rl-samples",
            "2",
            "--checkpoints",
            *checkpoints,
            "--output",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "overopt.json").read_text())
    assert result["bon"]["n"] == [1, 2, 3, 4, 5]
    assert result["bon"]["kl"][1] == pytest.approx(0.19314718, abs=1e-6)
    assert set(result["bon"]["fits"]) == {"proxy", "gold"}
    assert [p["step"] for p in result["rl"]["points"]] == [2, 4]
    assert all(p["kl_k3"] > 0 and p["d"] >= 0 for p in result["rl"]["points"])
    assert result["initial"]["proxy_gold_correlation"] is None  # constant proxy on tiny-model text
    assert len((out / "pool.jsonl").read_text().splitlines()) == 15
    for png in ("overopt_bon.png", "overopt_rl.png"):
        assert (out / png).stat().st_size > 10_000


def test_load_policy_from_checkpoint_and_base_model(tiny_model_dir, tmp_path):
    from alignkit.lab.policy_loading import base_model_of, checkpoint_step, load_policy

    (path,) = _training_run(tmp_path, tiny_model_dir, steps=(3,))
    model, _ = load_policy(path)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.all(p == 0.15) for p in lora_b)
    assert checkpoint_step(path) == 3 and checkpoint_step(tmp_path / "run" / "final") == 3
    assert base_model_of(path) == str(tiny_model_dir)
