"""Quality vs diversity of `sft` and `iq_learn` (Wulfmeier et al. 2024) on the tiny model.

Each setting trains the same random tiny Llama (float32, CPU) on the same rows for `--steps`
steps, then measures on held-out rows:
  quality    held-out NLL (token mean over completion tokens; lower is better) and, on the
             arithmetic data, the share of sampled answers that are right;
  diversity  per-prompt distinct-n (Kirk et al. 2023, `alignkit.eval.diversity`, mean of
             distinct-1..5 over `--samples` samples of each held-out prompt at temperature 1)
             and across-prompt distinct-n (one sample per prompt).
The shorter SFT runs are the fair baseline: SFT stopped early at the NLL a given lambda reaches
(is iq_learn's extra diversity more than what any less-fitted model has?).
Data: `arithmetic` = `alignkit.testing.synthetic_sft` (one right answer per prompt) and
`reviews` = the chosen side of `synthetic_pairs` (two random positive words: many right answers).

    python bench/iq_learn_tradeoff.py                       # default settings, 2 seeds
    python bench/iq_learn_tradeoff.py --seeds 1 --steps 30  # quick
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import alignkit  # noqa: E402
from alignkit.data import RowTable, collate_sequences, tokenize_sft  # noqa: E402
from alignkit.eval.diversity import diversity_metrics  # noqa: E402
from alignkit.models import load_model, sequence_logps  # noqa: E402
from alignkit.testing import build_tiny_model, synthetic_pairs, synthetic_sft  # noqa: E402

SETTINGS = [  # (label, algorithm, hyper-parameters); "steps" is a share of --steps
    ("sft", "sft", {}),
    ("sft, 1/2 of the steps", "sft", {"steps": 0.5}),
    ("sft, 1/3 of the steps", "sft", {"steps": 1 / 3}),
    ("iq_learn lambda=0.01", "iq_learn", {"lambda_": 0.01}),
    ("iq_learn lambda=0.1", "iq_learn", {"lambda_": 0.1}),
    ("iq_learn lambda=1", "iq_learn", {"lambda_": 1.0}),
    ("iq_learn lambda=0.1 gamma=0.9", "iq_learn", {"lambda_": 0.1, "gamma": 0.9}),
]


def datasets(seed: int) -> dict[str, tuple[list[dict], list[dict]]]:
    arithmetic = synthetic_sft(96, seed=seed)
    reviews = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in synthetic_pairs(96, seed=seed)]
    return {"arithmetic": (arithmetic[:80], arithmetic[80:]), "reviews": (reviews[:80], reviews[80:])}


@torch.no_grad()
def held_out_nll(model, tokenizer, rows: list[dict]) -> float:
    examples, _ = tokenize_sft(RowTable(rows), tokenizer, max_length=64)
    batch = collate_sequences(examples, tokenizer.pad_token_id)
    logps, counts = sequence_logps(model.eval(), batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return float(-logps.sum() / counts.sum())


@torch.no_grad()
def samples(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, seed: int) -> list[list[str]]:
    torch.manual_seed(seed)
    groups = []
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
        out = model.generate(ids.repeat(n, 1), attention_mask=torch.ones_like(ids).repeat(n, 1), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        groups.append([tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out])
    return groups


def right_answers(rows: list[dict], groups: list[list[str]]) -> float:
    """Share of samples whose first number is the row's sum (arithmetic data only)."""
    right = []
    for row, group in zip(rows, groups, strict=True):
        a, b = (int(x) for x in re.findall(r"\d+", row["prompt"]))
        for text in group:
            found = re.findall(r"\d+", text)
            right.append(bool(found) and int(found[0]) == a + b)
    return float(np.mean(right))


def run_setting(model_dir: Path, work: Path, label: str, algorithm: str, hparams: dict, data: str,
                train: list[dict], held: list[dict], args, seed: int) -> dict:
    out = work / f"{data}-{re.sub(r'[^a-z0-9=.]+', '_', label)}-{seed}"
    hparams = dict(hparams)
    steps = max(1, round(args.steps * hparams.pop("steps", 1.0)))
    result = alignkit.train(algorithm, model=str(model_dir), data=train, output_dir=out, batch_size=8,
                            max_steps=steps, lr=args.lr, warmup_ratio=0.0, scheduler="constant", seed=seed,
                            progress=False, **hparams)
    model, tokenizer = load_model(str(result.final_dir), kind="causal_lm")
    held = held[: args.prompts]
    groups = samples(model, tokenizer, [r["prompt"] for r in held], args.samples, 12, seed)
    diversity = diversity_metrics(groups, embedder=None)
    row = {"data": data, "setting": label, "seed": seed, "nll": held_out_nll(model, tokenizer, held),
           "distinct_per_prompt": diversity["per_input"]["distinct_avg"],
           "distinct_across_prompts": diversity["across_input"]["distinct_avg"]}
    if data == "arithmetic":
        row["right"] = right_answers(held, groups)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts sampled")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "tiny")
        for seed in range(args.seeds):
            for data, (train, held) in datasets(seed).items():
                for label, algorithm, hparams in SETTINGS:
                    rows.append(run_setting(model_dir, work, label, algorithm, hparams, data, train, held, args, seed))
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\nmean over {args.seeds} seed(s), {args.steps} steps, lr {args.lr}; NLL lower = better; "
          f"distinct = mean distinct-1..5 of {args.samples} samples/prompt at temperature 1")
    print(f"{'data':<11} {'setting':<32} {'NLL':>7} {'right':>6} {'distinct/prompt':>16} {'distinct/across':>16}")
    for data in ("arithmetic", "reviews"):
        for label, _, _ in SETTINGS:
            group = [r for r in rows if r["data"] == data and r["setting"] == label]
            right = f"{np.mean([r['right'] for r in group]):.2f}" if "right" in group[0] else "-"
            print(f"{data:<11} {label:<32} {np.mean([r['nll'] for r in group]):7.3f} {right:>6} "
                  f"{np.mean([r['distinct_per_prompt'] for r in group]):16.3f} "
                  f"{np.mean([r['distinct_across_prompts'] for r in group]):16.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
