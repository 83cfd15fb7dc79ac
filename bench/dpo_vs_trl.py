"""DPO training throughput and memory: alignkit against TRL's DPOTrainer, side by side.

Same model, data, batch size, max length, steps, learning rate (linear decay, no warm-up, as
TRL's default), beta, float32 on CPU. Each framework trains in a fresh child process (this
script with `--worker NAME`), in alternating A/B order over `--rounds`; medians are reported.

    python bench/dpo_vs_trl.py                          # random Llama, hidden 256, 4 layers
    python bench/dpo_vs_trl.py --steps 6 --rounds 1     # quick smoke run
    python bench/dpo_vs_trl.py --model ~/.cache/alignkit/smollm2-135m-instruct --batch-size 4

Frameworks: `alignkit`; `trl` = DPOTrainer with its defaults (reference log-probs on the fly
each step, gradient checkpointing on); `trl-pre` = the same with precompute_ref_log_probs=True.
Measured per child: `steps/s` over the training loop only (end of step 1 to end of step N,
so the first warm-up step is excluded), `tokens/s` = real (non-pad) prompt+response tokens of
both sequences of every pair per second of that loop (counted once here from the data, the same
for both; batches differ by order only, so the mean real tokens per pair x batch x steps is used),
`e2e` = load model + tokenise + reference pass + train + save, `peak RSS` of the child (ru_maxrss)
and `RSS base` = after importing torch + transformers, before either framework. Children run
with `--threads` torch threads (default 1: stable on a shared machine). TRL 1.x has no
max_prompt_length; the synthetic prompts stay under 128 tokens, so neither side cuts them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    current_rss_mib,
    emit_result,
    median_of,
    peak_rss_mib,
    print_table,
    ratio,
    run_rounds,
    run_worker,
)

FRAMEWORKS = ("alignkit", "alignkit-gc", "trl", "trl-pre")
# alignkit-gc: with gradient checkpointing, the memory-saving setting TRL uses by default.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "WANDB_DISABLED": "true",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local model dir (default: build a random tiny Llama)")
    parser.add_argument("--hidden-size", type=int, default=256, help="random model width")
    parser.add_argument("--num-layers", type=int, default=4, help="random model depth")
    parser.add_argument("--num-heads", type=int, default=4, help="random model attention heads")
    parser.add_argument("--pairs", type=int, default=0, help="preference pairs (0 = batch x steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step, both frameworks")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (>= 2)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=256, help="prompt + response tokens")
    parser.add_argument("--max-prompt-length", type=int, default=128,
                        help="alignkit only (TRL 1.x has no such option; the data keeps prompts shorter)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank for both (0 = full)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating A/B rounds")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset")
    parser.add_argument("--trl-no-gc", action="store_true",
                        help="turn off TRL's default gradient checkpointing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per child, same for both (default 1: on a shared box, multi-"
                        "threaded kernels stall whenever another process holds a core; 0 = torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--verbose", action="store_true", help="show the children's stderr")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2 and not args.worker:
        parser.error("--steps must be at least 2 (step 1 is the excluded warm-up)")
    return args


# --------------------------------------------------------------------------- data


def long_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs of varied length (~45-250 tokens per sequence with the tiny tokenizer):
    0-3 context sentences before the instruction, 2-8 clauses per response; chosen responses
    use positive words, rejected ones negative words, lengths drawn independently."""
    from alignkit.testing import CORPUS, NEGATIVE_WORDS, POSITIVE_WORDS, TOPICS

    rng = random.Random(seed)
    context = [s for s in sorted(set(CORPUS)) if not s[0].isdigit()]

    def response(words: list[str]) -> str:
        clauses = [
            f"{rng.choice(TOPICS).lower()} was {rng.choice(words)} and {rng.choice(words)}"
            for _ in range(rng.randint(2, 8))
        ]
        return " was " + ", ".join(clauses) + "."

    rows = []
    for _ in range(n):
        ctx = " ".join(rng.choice(context) for _ in range(rng.randint(0, 3)))
        prompt = f"{ctx} Write a short review. {rng.choice(TOPICS)}".strip()
        rows.append({"prompt": prompt, "chosen": response(POSITIVE_WORDS), "rejected": response(NEGATIVE_WORDS)})
    return rows


def count_tokens(rows: list[dict], tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Real tokens per pair (prompt + chosen + eos, prompt + rejected + eos), capped as trained."""

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    per_pair, seqs, truncated = [], [], 0
    for row in rows:
        prompt = min(n(row["prompt"]), max_prompt_length)
        total = 0
        for key in ("chosen", "rejected"):
            full = prompt + n(row[key]) + 1
            truncated += full > max_length
            seqs.append(min(full, max_length))
            total += seqs[-1]
        per_pair.append(total)
    return {
        "tokens_per_pair": statistics.mean(per_pair),
        "seq_len_min": min(seqs),
        "seq_len_median": statistics.median(seqs),
        "seq_len_max": max(seqs),
        "truncated_sequences": truncated,
    }


# --------------------------------------------------------------------------- workers


def loop_stats(stamps: list[float], losses: list[float], spec: dict) -> dict:
    """Steps/s and tokens/s from the end-of-step timestamps, step 1 excluded."""
    measured = len(stamps) - 1
    loop_s = stamps[-1] - stamps[0] if measured > 0 else float("nan")
    tokens = spec["tokens_per_pair"] * spec["batch_size"] * measured
    return {
        "steps": len(stamps),
        "loop_s": loop_s,
        "steps_per_s": measured / loop_s,
        "tokens_per_s": tokens / loop_s,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": statistics.mean(losses) if losses else None,
    }


def worker_alignkit(spec: dict, gradient_checkpointing: bool = False) -> dict:
    started = time.perf_counter()
    import alignkit
    import alignkit.training.offline  # noqa: F401  (alignkit imports lazily)

    import_s = time.perf_counter() - started
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    stamps, losses, peaks = [], [], []

    def on_step(step: int, metrics: dict) -> None:
        stamps.append(time.perf_counter())
        peaks.append(peak_rss_mib())
        losses.append(float(metrics["loss"]))

    begin = time.perf_counter()
    alignkit.train(
        "dpo", model=spec["model"], data=rows, output_dir=spec["out"], callbacks=(on_step,),
        batch_size=spec["batch_size"], max_steps=spec["steps"], lr=spec["lr"], beta=spec["beta"],
        max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"],
        warmup_ratio=0.0, scheduler="linear", lora_r=spec["lora_r"], seed=spec["seed"],
        dtype="float32", device="cpu", progress=False, gradient_checkpointing=gradient_checkpointing,
    )
    end_to_end = time.perf_counter() - begin
    return {"import_s": import_s, "end_to_end_s": end_to_end, **loop_stats(stamps, losses, spec),
            "peak_rss_step1_mib": peaks[0], "peak_rss_loop_mib": peaks[-1]}


def worker_trl(spec: dict, precompute: bool) -> dict:
    started = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    import_s = time.perf_counter() - started
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    stamps, losses, peaks = [], [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            peaks.append(peak_rss_mib())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    begin = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    peft_config = None
    if spec["lora_r"] > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    extra = {} if spec["trl_gc"] else {"gradient_checkpointing": False}
    config = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=spec["lr"], beta=spec["beta"], max_length=spec["max_length"],
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
        dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True, remove_unused_columns=False,
        precompute_ref_log_probs=precompute, **extra,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "final"))
    end_to_end = time.perf_counter() - begin
    return {"import_s": import_s, "end_to_end_s": end_to_end, "gradient_checkpointing": bool(config.gradient_checkpointing),
            **loop_stats(stamps, losses, spec),
            "peak_rss_step1_mib": peaks[0], "peak_rss_loop_mib": peaks[-1]}


def run_as_worker(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    # The common base of both frameworks, imported first: RSS above it is the framework's own.
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    rss_base = current_rss_mib()
    if args.worker.startswith("alignkit"):
        result = worker_alignkit(spec, gradient_checkpointing=args.worker == "alignkit-gc")
    else:
        result = worker_trl(spec, precompute=args.worker == "trl-pre")
    result["peak_rss_mib"] = peak_rss_mib()
    result["rss_base_mib"] = rss_base
    result["torch_threads"] = torch.get_num_threads()
    result["framework"] = args.worker
    emit_result(result)


# --------------------------------------------------------------------------- parent


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    model_dir = args.model
    if model_dir is None:
        from alignkit.testing import build_tiny_model

        model_dir = build_tiny_model(workdir / "model", hidden_size=args.hidden_size,
                                     num_layers=args.num_layers, num_heads=args.num_heads, seed=args.seed)
    model_dir = str(Path(model_dir).expanduser())
    rows = long_pairs(args.pairs or args.batch_size * args.steps, seed=args.seed)
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stats = count_tokens(rows, tokenizer, args.max_length, args.max_prompt_length)
    return {
        "model": model_dir, "data": str(data), "pairs": len(rows), "batch_size": args.batch_size,
        "steps": args.steps, "lr": args.lr, "beta": args.beta, "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length, "lora_r": args.lora_r, "seed": args.seed,
        "threads": args.threads, "trl_gc": not args.trl_no_gc, **stats,
    }


def report(spec: dict, results: dict[str, list[dict]], names: list[str]) -> dict:
    keys = ("steps_per_s", "tokens_per_s", "loop_s", "end_to_end_s", "peak_rss_mib", "rss_base_mib",
            "peak_rss_step1_mib", "peak_rss_loop_mib",
            "import_s", "first_loss", "final_loss", "mean_loss")
    medians = {name: {k: median_of(results[name], k) for k in keys} for name in names}
    print_table(
        ["framework", "steps/s", "tokens/s", "loop s", "e2e s", "peak RSS MiB", "peak@step1", "RSS base MiB",
         "loss 1st", "loss last", "loss mean"],
        [[n, m["steps_per_s"], m["tokens_per_s"], m["loop_s"], m["end_to_end_s"], m["peak_rss_mib"],
          m["peak_rss_step1_mib"], m["rss_base_mib"], m["first_loss"], m["final_loss"], m["mean_loss"]]
         for n, m in medians.items()],
        title=f"medians over {len(next(iter(results.values())))} round(s)",
    )
    ratios = {}
    for ours_name in [n for n in names if n.startswith("alignkit")]:
        ours = medians[ours_name]
        for name in [n for n in names if n.startswith("trl")]:
            theirs = medians[name]
            ratios[f"{ours_name} vs {name}"] = {
                "steps_per_s": ratio(ours["steps_per_s"], theirs["steps_per_s"]),
                "tokens_per_s": ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
                "end_to_end_speedup": ratio(theirs["end_to_end_s"], ours["end_to_end_s"]),
                "peak_rss": ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"]),
                "peak_rss_above_base": ratio(
                    ours["peak_rss_mib"] - ours["rss_base_mib"],
                    theirs["peak_rss_mib"] - theirs["rss_base_mib"],
                ),
            }
    if ratios:
        print_table(
            ["pair", "steps/s", "tokens/s", "e2e speed-up", "peak RSS", "RSS above base"],
            [[n, r["steps_per_s"], r["tokens_per_s"], r["end_to_end_speedup"], r["peak_rss"],
              r["peak_rss_above_base"]] for n, r in ratios.items()],
            title="ratios alignkit / TRL (speed: >1 = alignkit faster; memory: <1 = alignkit smaller)",
        )
    return {"medians": medians, "ratios": ratios}


def main() -> None:
    args = parse_args()
    if args.worker:
        run_as_worker(args)
        return
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = sorted(set(names) - set(FRAMEWORKS))
    if unknown:
        sys.exit(f"unknown framework(s) {unknown}; choose from {list(FRAMEWORKS)}")
    os.environ.update(WORKER_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    spec = prepare(args, workdir)
    print(f"model {spec['model']}; {spec['pairs']} pairs, batch {spec['batch_size']}, {spec['steps']} steps, "
          f"lr {spec['lr']}, beta {spec['beta']}, max_length {spec['max_length']}, lora_r {spec['lora_r']}")
    print(f"sequence tokens min/median/max {spec['seq_len_min']}/{spec['seq_len_median']}/"
          f"{spec['seq_len_max']} ({spec['truncated_sequences']} truncated); "
          f"{spec['tokens_per_pair']:.1f} real tokens per pair; TRL gradient checkpointing "
          f"{'on (its default)' if spec['trl_gc'] else 'off'}; torch threads {args.threads or 'default'}")

    def run_one(name: str, round_index: int) -> dict:
        out = workdir / f"{name}-{round_index}"
        spec_path = workdir / f"spec-{name}-{round_index}.json"
        spec_path.write_text(json.dumps({**spec, "out": str(out)}))
        env = {"HF_DATASETS_CACHE": str(out / "hf-datasets")}
        if args.threads > 0:
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        return run_worker(__file__, name, spec_path, timeout=args.timeout, env=env, verbose=args.verbose)

    results = run_rounds(names, args.rounds, run_one, log=lambda s: print(s, flush=True))
    summary = report(spec, results, names)
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "runs": results, **summary}, indent=2))
        print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
