"""HFT (`--set hft=true`, alignkit.training.run.hft): the per-block split rule, draws that are a
pure function of (seed, round), frozen tensors untouched by AdamW through their round, exact
resume across a round boundary, learning with half the weights, the online loop, the CLI."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from run_helpers import (
    PAIRWISE_DETERMINISTIC,
    assert_resumed_matches,
    read_metrics,
    run_interrupted_and_resumed,
    write_jsonl,
)

import alignkit
from alignkit.cli import main as cli_main
from alignkit.models import load_model
from alignkit.testing import synthetic_pairs, synthetic_sft
from alignkit.training.run.hft import (
    ATTENTION,
    FFN,
    NORMS,
    block_layout,
    draw_frozen,
    frozen_names,
    round_of_step,
)


def test_round_of_step_worked_example():
    """N = 3: steps 1-3 are round 0, 4-6 round 1, 7 round 2; N = 0: one round."""
    assert [round_of_step(s, 3) for s in range(1, 8)] == [0, 0, 0, 1, 1, 1, 2]
    assert {round_of_step(s, 0) for s in range(1, 100)} == {0}


@pytest.mark.parametrize("num_blocks", [1, 4, 5])
def test_each_block_freezes_exactly_its_half_of_the_categories(num_blocks):
    """Per block 2 of 4 attention matrices and 1 of 2 norms; FFN 2 of 3 in floor(L/2) blocks,
    1 of 3 in the rest. L = 4: 2 x 2 + 2 x 1 = 6 of 12 FFN matrices, exactly half."""
    for round_index in range(6):
        frozen = draw_frozen(num_blocks, seed=7, round_index=round_index)
        assert len(frozen) == num_blocks
        ffn_counts = []
        for block in frozen:
            assert sum(c in block for c in ATTENTION) == 2
            assert sum(c in block for c in NORMS) == 1
            ffn_counts.append(sum(c in block for c in FFN))
        assert sorted(ffn_counts) == [1] * (num_blocks - num_blocks // 2) + [2] * (num_blocks // 2)
    assert sum(len(b) for b in draw_frozen(4, seed=0, round_index=0)) == 18  # of 36 block matrices/vectors


def test_draws_are_a_pure_function_of_seed_and_round():
    draws = [draw_frozen(8, seed=3, round_index=r) for r in range(5)]
    assert draws == [draw_frozen(8, seed=3, round_index=r) for r in range(5)]  # reproducible
    assert len({tuple(d) for d in draws}) == 5  # every round its own half
    assert draw_frozen(8, seed=4, round_index=0) != draws[0]


def test_layout_covers_llama_blocks_and_names_an_unknown_block(tiny_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model, _ = load_model(str(tiny_model_dir))
    layout = block_layout(model)
    assert len(layout) == model.config.num_hidden_layers
    assert layout[1]["q_proj"] == ["model.layers.1.self_attn.q_proj.weight"]
    assert layout[0]["post_attention_layernorm"] == ["model.layers.0.post_attention_layernorm.weight"]
    block_params = {n for n, _ in model.named_parameters() if n.startswith("model.layers.")}
    assert {n for block in layout for names in block.values() for n in names} == block_params
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match=r"block transformer\.h\.0 \(GPT2Block\) is not a Llama-style block"):
        block_layout(gpt2)


def test_frozen_tensors_stay_bit_identical_through_their_round(tiny_model_dir, tmp_path):
    """DPO with weight decay 0.1, rounds of 3 steps: each round's frozen block tensors are the
    same bytes at its end as at its start (no gradient, no decay, no Adam move); the trainable
    half and the embeddings / LM head / final norm all moved; the round files say so."""
    model, tokenizer = load_model(str(tiny_model_dir))
    snapshots = {0: {n: p.detach().clone() for n, p in model.named_parameters()}}

    def snapshot(step, metrics):
        if step % 3 == 0:
            snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    alignkit.train("dpo", model=model, tokenizer=tokenizer, data=synthetic_pairs(24, seed=1), output_dir=tmp_path / "r",
                   batch_size=4, max_steps=6, lr=1e-2, weight_decay=0.1, hft=True, hft_round_steps=3, seed=5,
                   progress=False, callbacks=(snapshot,))
    layout = block_layout(model)
    for round_index, (start, end) in enumerate([(0, 3), (3, 6)]):
        frozen = frozen_names(layout, draw_frozen(len(layout), seed=5, round_index=round_index))
        assert frozen
        for name in snapshots[0]:
            same = torch.equal(snapshots[start][name], snapshots[end][name])
            assert same == (name in frozen), (round_index, name)
        record = json.loads((tmp_path / "r" / "hft" / f"round-{round_index:06d}.json").read_text())
        assert record["first_step"] == start + 1 and record["last_step"] == end
        assert record["block_trainable_fraction"] == 0.5  # Llama blocks: equal-sized categories
        for block, drawn in zip(record["blocks"], draw_frozen(len(layout), 5, round_index), strict=True):
            assert tuple(block["frozen"]) == drawn
    rows = read_metrics(tmp_path / "r")
    assert [r["hft/round"] for r in rows] == [0, 0, 0, 1, 1, 1]
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers."))
    assert rows[0]["hft/trainable_fraction"] == pytest.approx(1 - 0.5 * blocks / total)


def test_resume_across_a_round_boundary_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Rounds of 3 steps, checkpoints every 2: cut at step 5, resumed from step 4 (inside round
    1), it crosses into round 2 at step 7 and logs what the uninterrupted run logged."""
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=3))
    common = dict(model=str(tiny_model_dir), data=data, batch_size=4, max_steps=8, lr=5e-3, save_steps=2,
                  hft=True, hft_round_steps=3, progress=False)
    runs = run_interrupted_and_resumed(partial(alignkit.train, "dpo", **common), tmp_path, at=5)
    assert_resumed_matches(runs.full, runs.resumed, PAIRWISE_DETERMINISTIC + ("hft/round", "hft/trainable_fraction"),
                           steps=8)
    for (name, p), (_, q) in zip(runs.full_result.model.named_parameters(),
                                 runs.resumed_result.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_sft_with_hft_lowers_held_out_nll(tiny_model_dir, tmp_path):
    rows = synthetic_sft(80, seed=0)
    alignkit.train("sft", model=str(tiny_model_dir), data=rows[:64], eval_data=rows[64:], output_dir=tmp_path / "s",
                   batch_size=8, max_steps=24, lr=5e-3, eval_steps=4, hft=True, hft_round_steps=8, progress=False)
    evals = [r["eval/loss"] for r in read_metrics(tmp_path / "s") if "eval/loss" in r]
    assert len(evals) == 6 and evals[-1] < 0.7 * evals[0], evals
    assert sorted(p.name for p in (tmp_path / "s" / "hft").iterdir()) == [f"round-00000{i}.json" for i in range(3)]


def test_online_grpo_with_hft_updates_only_the_trainable_half(tiny_model_dir, tmp_path):
    def count_e(prompts, completions, **columns):
        return [float(text.count("e")) for text in completions]

    model, tokenizer = load_model(str(tiny_model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [{"prompt": p} for p in ("Write a short review.", "The movie", "Tell me", "What is two plus two?")]
    alignkit.train("grpo", model=model, tokenizer=tokenizer, data=prompts, output_dir=tmp_path / "g", reward=count_e,
                   batch_size=2, max_steps=2, lr=1e-2, group_size=4, max_new_tokens=8, hft=True, progress=False)
    rows = read_metrics(tmp_path / "g")
    assert [r["step"] for r in rows] == [1, 2] and all(0.5 < r["hft/trainable_fraction"] < 1 for r in rows)
    layout = block_layout(model)
    frozen = frozen_names(layout, draw_frozen(len(layout), seed=42, round_index=0))
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name in frozen), name
    assert (tmp_path / "g" / "hft" / "round-000000.json").is_file()


def test_hft_refuses_adapters_and_frozen_backbones(tiny_model_dir, tmp_path):
    common = dict(model=str(tiny_model_dir), data=synthetic_pairs(4), progress=False)
    with pytest.raises(ValueError, match=r"--set hft=true: HFT freezes half of the full weights.*--adapter lora"):
        alignkit.train("dpo", output_dir=tmp_path / "a", hft=True, lora_r=4, **common)
    with pytest.raises(ValueError, match=r"--adapter ssf trains none of them"):
        alignkit.train("dpo", output_dir=tmp_path / "b", hft=True, adapter="ssf", **common)
    with pytest.raises(ValueError, match="--hft-round-steps applies to --set hft=true"):
        alignkit.train("dpo", output_dir=tmp_path / "c", hft_round_steps=4, **common)
    with pytest.raises(ValueError, match="rm_ensemble trains heads on a frozen backbone"):
        alignkit.train("rm_ensemble", output_dir=tmp_path / "d", hft=True, shared_trunk=True, **common)
    with pytest.raises(ValueError, match="--hft-round-steps must be >= 0, got -1"):
        alignkit.train("dpo", output_dir=tmp_path / "e", hft=True, hft_round_steps=-1, **common)


def test_cli_takes_hft_and_the_ssf_adapter(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", synthetic_sft(8))
    base = ["train", "sft", "--model", str(tiny_model_dir), "--data", data, "--max-steps", "2", "--batch-size", "4",
            "--no-progress"]
    assert cli_main([*base, "--output", str(tmp_path / "h"), "--set", "hft=true", "--set", "hft_round_steps=1"]) == 0
    assert [r["hft/round"] for r in read_metrics(tmp_path / "h")] == [0, 1]
    assert cli_main([*base, "--output", str(tmp_path / "s"), "--adapter", "ssf", "--ssf-target-modules",
                     "q_proj,down_proj"]) == 0
    assert "adapter: ssf" in (tmp_path / "s" / "config.yaml").read_text()
    assert cli_main([*base, "--output", str(tmp_path / "x"), "--set", "hft_round_steps=2"]) != 0
    assert "--hft-round-steps applies to --set hft=true" in capsys.readouterr().err
