"""The online-vs-offline gap (Tang et al. 2024, "Understanding the performance gap between online
and offline alignment algorithms") on one machine: the same budget for an online and an offline
preference method, measured on a gold reward.

Budget: `--steps` updates of `--batch-size` preference pairs each, best vs worst of `--n`
samples per prompt scored by the gold reward, the same loss (DPO, `--beta`), LoRA, learning rate
and prompts. The only difference is where the pairs come from:

  offline  `dpo` on pairs sampled ONCE from the initial model (`alignkit label`);
  online   `online_dpo` on pairs sampled from the CURRENT policy at every step.

Each policy (and the initial model) is measured on held-out prompts:
  gold reward  of `--eval-samples` samples per prompt, with its 95% interval (`alignkit eval`);
  KL           to the initial model (k1, sampled);
  classification  the policy's implicit reward beta log pi/pi_ref ranking the held-out pairs
               (best vs worst of `--n` initial-model samples by the gold reward) correctly
               (`alignkit eval-rm --policy`): Tang et al.'s finding is that offline policies
               classify well and generate worse, so good classification does not imply a good
               policy.

    python examples/online_vs_offline/run.py                 # SmolLM2-135M + VADER
    python examples/online_vs_offline/run.py --dry-run       # a tiny random model, seconds

results.json and report.md get every number; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import alignkit
from alignkit.data import builtin_prompts, load_rows
from alignkit.eval.reward_eval import pairwise_metrics
from alignkit.eval.stats import format_table
from alignkit.lab import evaluate_model
from alignkit.lab.implicit_rm import implicit_pair_rewards
from alignkit.lab.label import LabelOptions, run_label
from alignkit.lab.overopt_lab import load_scorer
from alignkit.lab.policy_loading import load_policy

HERE = Path(__file__).resolve().parent


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def label(model: str, prompts: Path, out: Path, args: argparse.Namespace) -> Path:
    run_label(LabelOptions(prompts=str(prompts), model=model, reward=args.gold, out=str(out), n=args.n,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, no_progress=True))
    return out


def train(method: str, model: str, output: Path, args: argparse.Namespace, **data: Any) -> dict[str, Any]:
    started = time.perf_counter()
    result = alignkit.train(method, model=model, output_dir=str(output), batch_size=args.batch_size,
                            max_steps=args.steps, lr=args.lr, lora_r=args.lora_r, beta=args.beta,
                            warmup_ratio=0.0, scheduler="constant", seed=args.seed, progress=False, overwrite=True, **data)
    return {"final": str(result.final_dir), "seconds": round(time.perf_counter() - started, 1)}


def measure(name: str, path: str, base: str, heldout: list[str], pairs: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Gold reward and KL of samples on the held-out prompts; pair classification."""
    policy, tokenizer = load_policy(path)
    reference = None if path == base else load_policy(base)[0].eval()
    gold = load_scorer(args.gold)
    report = evaluate_model(policy.eval(), tokenizer, heldout, reward=gold, reference=reference,
                            samples=args.eval_samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            embedder=None, name=name)
    out = {"gold_reward": (report["gold_reward"], report["ci_low"], report["ci_high"]),
           "kl": report.get("kl") if reference is not None else 0.0}
    if reference is not None:
        table = load_rows(str(pairs))
        chosen, rejected = implicit_pair_rewards(policy, reference, tokenizer, table, beta=args.beta)
        metrics = pairwise_metrics(chosen, rejected)
        out["classification"] = (metrics["accuracy"], *metrics["accuracy_ci"])
        out["classification_ties_half"] = metrics["accuracy_ties_half"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gold", default="vader", help="the gold reward (a reward spec)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs (= prompts) per update")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt a pair is chosen from")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(HERE / "run"))
    parser.add_argument("--dry-run", action="store_true", help="a tiny random model and tiny budget (seconds)")
    args = parser.parse_args(argv)
    if args.dry_run:  # a random model writes no sentiment: a length gold reward tells its samples apart
        args.steps, args.batch_size, args.n, args.eval_prompts, args.eval_samples = 2, 2, 4, 2, 2
        args.max_new_tokens, args.lr, args.gold = 8, 1e-3, "length:3"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    scratch = None
    if args.dry_run:
        from alignkit.testing import build_tiny_model

        scratch = tempfile.TemporaryDirectory(prefix="online-offline-dry-run-")
        args.model = str(build_tiny_model(Path(scratch.name) / "tiny"))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    prompts = builtin_prompts()
    train_prompts = (prompts["train"] * (1 + args.steps * args.batch_size // len(prompts["train"])))
    train_prompts = train_prompts[: args.steps * args.batch_size]  # one pass: every update sees new prompts
    heldout = prompts["heldout"][: args.eval_prompts]
    started = time.perf_counter()
    timings = {}
    t = time.perf_counter()
    train_pairs = label(args.model, write_prompts(out / "train_prompts.jsonl", train_prompts), out / "pairs_train.jsonl", args)
    heldout_pairs = label(args.model, write_prompts(out / "heldout_prompts.jsonl", heldout), out / "pairs_heldout.jsonl", args)
    timings["label_s"] = round(time.perf_counter() - t, 1)
    offline = train("dpo", args.model, out / "offline_dpo", args, data=str(train_pairs))
    online = train("online_dpo", args.model, out / "online_dpo", args,
                   data=str(out / "train_prompts.jsonl"), reward=args.gold, group_size=args.n,
                   max_new_tokens=args.max_new_tokens)
    timings.update(offline_train_s=offline["seconds"], online_train_s=online["seconds"])
    rows = {}
    for name, path in (("initial", args.model), ("offline dpo", offline["final"]), ("online dpo", online["final"])):
        rows[name] = measure(name, path, args.model, heldout, heldout_pairs, args)
    results = {"settings": vars(args), "budget": {"updates": args.steps, "pairs_per_update": args.batch_size,
                                                   "samples_per_pair": args.n},
               "policies": rows, "timings": timings, "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table([{"policy": name, **values} for name, values in rows.items()],
                         ["policy", "gold_reward", "kl", "classification"], float_format=".3f")
    (out / "report.md").write_text(f"# Online vs offline, same budget\n\n```\n{table}\n```\n")
    print(table)
    print(f"budget: {args.steps} updates x {args.batch_size} pairs (best vs worst of {args.n}); "
          f"{results['seconds']} s; written: {out / 'results.json'}, {out / 'report.md'}")
    if scratch is not None:
        scratch.cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
