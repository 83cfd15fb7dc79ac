"""`alignkit merge` methods that read data: greedy soup on a held-out score (NLL and a reward on
greedy completions) rejects a planted model that lowers it; HMA's learned ratios keep their
mean and move towards the model that fits the planted data."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from alignkit.cli import main
from alignkit.data import collate_sequences, load_rows, tokenize_sft
from alignkit.models import load_model, save_pretrained_merged, sequence_logps
from alignkit.testing import build_tiny_model, synthetic_sft


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fine_tune(source, target, rows, *, steps, lr=1e-2, only=None):
    """A few Adam steps of SFT on `rows`, updating only the parameters whose name contains
    `only` (all when None); saved to `target`."""
    model, tokenizer = load_model(str(source), dtype=torch.float32, device="cpu")
    examples, _ = tokenize_sft(load_rows(rows), tokenizer, max_length=64)
    batch = collate_sequences(examples, tokenizer.pad_token_id)
    trained = [p for n, p in model.named_parameters() if only is None or only in n]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(only is None or only in name)
    optimizer = torch.optim.Adam(trained, lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        loss = -logps.sum() / lengths.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_pretrained_merged(model, tokenizer, target)
    return target


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """base (random), good (base fine-tuned on the rows), good_copy (the same weights) and bad
    (an unrelated random init); trained_top (base with only layer 1 fine-tuned)."""
    root = tmp_path_factory.mktemp("planted")
    rows = synthetic_sft(16, seed=1)
    base = build_tiny_model(root / "base", seed=0)
    good = fine_tune(base, root / "good", rows, steps=30)
    shutil.copytree(good, root / "good_copy")
    bad = build_tiny_model(root / "bad", seed=7)
    top = fine_tune(base, root / "top", rows, steps=30, only="layers.1.")
    data = write_jsonl(root / "rows.jsonl", rows)
    return {"base": base, "good": good, "good_copy": root / "good_copy", "bad": bad, "top": top, "data": data}


def test_greedy_soup_rejects_the_model_that_lowers_the_held_out_score(planted, tmp_path, capsys):
    """Scores = −NLL per token on the held-out rows. Sorted: good, good_copy (a tie keeps the
    given order), bad. good_copy averages to the same soup (same score, >=): kept; the soup
    with bad scores lower: rejected. The soup is good's weights."""
    out = tmp_path / "soup"
    code = main(["merge", "--method", "greedy_soup", "--models", str(planted["bad"]), str(planted["good"]),
                 str(planted["good_copy"]), "--eval-data", str(planted["data"]), "--output", str(out)])
    assert code == 0
    record = json.loads((out / "merge.json").read_text())
    decisions = record["decisions"]
    assert [d["name"] for d in decisions] == [str(planted["good"]), str(planted["good_copy"]), str(planted["bad"])]
    assert [d["accepted"] for d in decisions] == [True, True, False]
    assert decisions[2]["candidate_score"] < decisions[1]["soup_score"]
    assert decisions[0]["ingredient_score"] > decisions[2]["ingredient_score"]
    assert record["ingredients"] == [str(planted["good"]), str(planted["good_copy"])]
    good = load_file(f"{planted['good']}/model.safetensors")
    merged = load_file(f"{out}/model.safetensors")
    for name, tensor in good.items():
        assert_close(merged[name], tensor, atol=1e-6, rtol=0)
    printed = capsys.readouterr().out
    assert "-> rejected" in printed and "-> kept" in printed


def test_greedy_soup_scores_a_reward_on_greedy_completions(planted, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 plus 3?"}, {"prompt": "The movie"}])
    out = tmp_path / "soup"
    code = main(["merge", "--method", "greedy_soup", "--models", str(planted["base"]), str(planted["bad"]),
                 "--eval-data", str(prompts), "--reward", "length:4", "--max-new-tokens", "6", "--output", str(out)])
    assert code == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["reward"] == "length:4" and record["max_new_tokens"] == 6
    assert len(record["decisions"]) == 2 and record["decisions"][0]["accepted"]
    # the decision follows the rule: kept iff the soup's score did not drop
    first, second = record["decisions"]
    assert second["accepted"] == (second["candidate_score"] >= first["soup_score"])


def test_hma_learned_ratios_keep_the_mean_and_move_on_planted_data(planted, tmp_path, capsys):
    """A = base, B = base with only layer 1 fine-tuned on the rows: only block 1's ratio
    changes the model, and less of A there fits the rows better, so α_1 falls below ᾱ = 0.5
    and α_0 rises above it (mean fixed); the NLL falls."""
    out = tmp_path / "hma"
    code = main(["merge", "--method", "hma", "--base", str(planted["base"]), "--models", str(planted["top"]),
                 "--alpha", "0.5", "--blocks", "2", "--data", str(planted["data"]), "--steps", "6", "--lr", "0.3",
                 "--output", str(out)])
    assert code == 0
    record = json.loads((out / "merge.json").read_text())
    low, high = record["ratios"][1], record["ratios"][0]
    assert low < 0.45 and high > 0.55
    assert (low + high) / 2 == pytest.approx(0.5, abs=1e-6)
    history = record["history"]
    assert len(history) == 6 and history[-1]["nll"] < history[0]["nll"]
    assert "learned ratios: block 0" in capsys.readouterr().out
    a = load_file(f"{planted['base']}/model.safetensors")
    b = load_file(f"{planted['top']}/model.safetensors")
    merged = load_file(f"{out}/model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    assert (a[name] - b[name]).abs().max() > 1e-3
    assert_close(merged[name], low * a[name] + (1 - low) * b[name], atol=1e-6, rtol=0)
    name = "lm_head.weight"  # after the blocks: ᾱ
    assert_close(merged[name], 0.5 * a[name] + 0.5 * b[name], atol=1e-6, rtol=0)


def test_hma_learning_defaults_are_the_reference_scripts():
    """ε = 0.2 and reg = 1e-4 (run_mask_finetune_raft.sh: epsilon=0.2, reg_alpha=1e-4), on the
    CLI and on `optimise_hma` alike."""
    import inspect

    from alignkit.merge.command import DEFAULTS
    from alignkit.merge.hma_opt import REFERENCE_EPSILON, REFERENCE_REG, optimise_hma

    assert (REFERENCE_EPSILON, REFERENCE_REG) == (0.2, 1e-4)
    assert DEFAULTS["epsilon"] == 0.2 and DEFAULTS["reg"] == 1e-4
    parameters = inspect.signature(optimise_hma).parameters
    assert parameters["epsilon"].default == 0.2 and parameters["reg"].default == 1e-4


def test_hma_penalty_counts_each_linear_layer_once(planted, tmp_path):
    """Tiny Llama, 2 layers, 2 blocks: 7 linear weights per layer (q, k, v, o, gate, up, down)
    -> c = [7, 7]. The loss of step t is the NLL plus reg · Σ_k c_k |α_k − ᾱ| at the ratios
    step t − 1 left (history rows hold the ratios after their step); with ε = 0.2 the ratios
    are those of hma_ratios(s, ᾱ, 0.2) of the recorded scores."""
    from alignkit.merge.methods import hma_ratios

    out = tmp_path / "hma"
    assert main(["merge", "--method", "hma", "--base", str(planted["base"]), "--models", str(planted["top"]),
                 "--alpha", "0.5", "--blocks", "2", "--data", str(planted["data"]), "--steps", "3", "--lr", "0.3",
                 "--reg", "0.5", "--output", str(out)]) == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["epsilon"] == 0.2 and record["reg"] == 0.5 and record["reg_linear_counts"] == [7, 7]
    history = record["history"]
    assert max(abs(r - 0.5) for r in history[0]["ratios"]) > 1e-3  # the penalty is not zero
    for before, row in zip(history, history[1:], strict=False):
        penalty = 0.5 * sum(7 * abs(r - 0.5) for r in before["ratios"])
        assert row["loss"] - row["nll"] == pytest.approx(penalty, rel=1e-4, abs=1e-6)
    assert history[0]["loss"] == pytest.approx(history[0]["nll"], abs=1e-6)  # starts at ᾱ: no penalty
    expected = hma_ratios(torch.tensor(record["block_scores"]), 0.5, 0.2)
    assert_close(torch.tensor(record["ratios"]), expected, atol=1e-6, rtol=0)


def test_greedy_soup_scores_an_eval_metric_lower_is_better(planted, tmp_path, capsys):
    """--score eval:kl_k3 --ref base: evaluate_model's sampled k3 KL to base (non-negative terms;
    k1 can dip below 0 on 4 samples), lower is better, so the score is −KL. base's own KL is 0
    (it is the reference): it is sorted first; every soup with another model moves away from
    base (KL > 0, score < 0): rejected. The soup is base."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 plus 3?"}, {"prompt": "The movie"}])
    out = tmp_path / "soup"
    code = main(["merge", "--method", "greedy_soup", "--models", str(planted["good"]), str(planted["base"]),
                 str(planted["bad"]), "--eval-data", str(prompts), "--score", "eval:kl_k3", "--ref", str(planted["base"]),
                 "--reward", "length:4", "--samples", "2", "--max-new-tokens", "5", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "merge.json").read_text())
    assert record["metric"] == "kl_k3" and record["direction"] == "min" and record["samples"] == 2
    decisions = record["decisions"]
    assert decisions[0]["name"] == str(planted["base"])
    assert decisions[0]["ingredient_score"] == pytest.approx(0.0, abs=1e-4)
    assert [d["accepted"] for d in decisions] == [True, False, False]
    assert all(d["candidate_score"] < -1e-3 for d in decisions[1:])
    assert record["ingredients"] == [str(planted["base"])]
    base = load_file(f"{planted['base']}/model.safetensors")
    merged = load_file(f"{out}/model.safetensors")
    for name, tensor in base.items():
        assert_close(merged[name], tensor, atol=1e-6, rtol=0)
    assert "scores are minus kl_k3" in capsys.readouterr().out


def test_greedy_soup_eval_score_is_what_alignkit_eval_reports(planted, tmp_path):
    """eval:diversity/per_input/distinct_1 (higher is better): the own score recorded for a model
    equals the number `alignkit eval` writes to eval.json for it, same prompts, samples, seed."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 plus 3?"}, {"prompt": "The movie"}])
    out = tmp_path / "soup"
    settings = ["--reward", "length:4", "--samples", "3", "--max-new-tokens", "6", "--seed", "1"]
    assert main(["merge", "--method", "greedy_soup", "--models", str(planted["base"]), str(planted["bad"]),
                 "--eval-data", str(prompts), "--score", "eval:diversity/per_input/distinct_1", *settings,
                 "--output", str(out)]) == 0
    record = json.loads((out / "merge.json").read_text())
    first, second = record["decisions"]
    assert second["accepted"] == (second["candidate_score"] >= first["soup_score"])
    for decision in record["decisions"]:
        eval_dir = tmp_path / "eval"
        assert main(["eval", "--model", decision["name"], "--prompts", str(prompts), *settings,
                     "--no-embeddings", "--output", str(eval_dir)]) == 0
        reported = json.loads((eval_dir / "eval.json").read_text())["diversity"]["per_input"]["distinct_1"]
        assert decision["ingredient_score"] == pytest.approx(reported, abs=1e-9)


@pytest.mark.parametrize("score, extra, message", [
    ("eval:reward/average", [], r"unknown eval metric 'reward/average'; one of gold_reward, .*kl"),
    ("eval:kl", [], "compares with a reference model; add --ref"),
    ("eval:mean_length_tokens", [], "no better direction; write eval:mean_length_tokens:max"),
    ("eval:gold_reward", ["--ref", "REF"], "does not read a reference"),
    ("nll", ["--samples", "2"], "--samples is a setting of an eval: --score"),
    ("reward", [], "--score reward needs --reward"),
])
def test_greedy_soup_score_errors_are_one_line(planted, tmp_path, capsys, score, extra, message):
    import re

    extra = [str(planted["base"]) if item == "REF" else item for item in extra]
    code = main(["merge", "--method", "greedy_soup", "--models", str(planted["base"]), str(planted["bad"]),
                 "--eval-data", str(planted["data"]), "--score", score, *extra, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("alignkit merge: error: ")]
    assert code == 2 and len(errors) == 1 and re.search(message, errors[0]), err
    assert not (tmp_path / "out").exists()
