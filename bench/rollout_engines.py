"""Rollout engines and placements side by side: alignkit's in-process HFEngine vs a vLLM server
(over HTTP), and a GRPO step's time split for each engine and placement, synchronous and
one-step-off asynchronous.

1. Sampling throughput (with vllm among `--engines`): `--prompts` prompts x `--group-size`
   samples of exactly `--max-new-tokens` tokens (EOS ignored), temperature 1, A/B rounds
   alternating, medians.
2. GRPO steps on the same prompts, one row per variant (`--variants`, default all that the
   engines allow):
   - hf: local, colocate:2 (two policy workers on Ray, one torch.distributed group),
     split:1,1 (a Ray rollout worker with its own copy), split:1,1 + async_rollout;
   - vllm: local, local + async_rollout, split:1,1 (the rollout worker starts its own server),
     local + adapter-only LoRA sync (`--vllm-lora-sync adapter`: a server alignkit starts with
     vLLM's runtime LoRA, sent the adapter after each update instead of the merged weights).
   Each row is the median of each step-time part over the steps after the first
   (time/generation_s, time/scoring_s, time/logprobs_s, time/training_s, time/sync_s,
   time/step_s; with async, async/wait_s and async/overlap_s) and the whole train call's wall
   time (what a stopwatch sees, Ray start-up included).

Ratios are what to read (the machine is shared): vLLM/HF tokens per second, and each variant's
step time and train-call time over the local hf one. vllm needs .venv-vllm (make vllm); Ray
placements need ray (pip install alignkit[ray]).

    python bench/rollout_engines.py                            # SmolLM2-135M (embedded), all variants
    python bench/rollout_engines.py --engines hf --steps 4     # placements only, no vLLM
    python bench/rollout_engines.py --variants hf,hf@split:1,1+async --model DIR
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignkit.models import load_model, save_pretrained_merged
from alignkit.rollout import HFEngine, SamplingParams
from alignkit.rollout.http_engine import HTTPEngine
from alignkit.rollout.vllm_server import start_vllm_server

REPO = Path(__file__).resolve().parents[1]
STEP_KEYS = ("time/generation_s", "time/scoring_s", "time/logprobs_s", "time/training_s", "time/sync_s",
             "time/step_s", "async/wait_s", "async/overlap_s")
# name -> (engine, placement, async_rollout, LoRA sync); async needs an engine with its own copy
# of the weights
VARIANTS = {
    "hf": ("hf", "local", False, "merged"),
    "hf@colocate:2": ("hf", "colocate:2", False, "merged"),
    "hf@split:1,1": ("hf", "split:1,1", False, "merged"),
    "hf@split:1,1+async": ("hf", "split:1,1", True, "merged"),
    "vllm": ("vllm", "local", False, "merged"),
    "vllm+async": ("vllm", "local", True, "merged"),
    "vllm@split:1,1": ("vllm", "split:1,1", False, "merged"),
    "vllm+adapter": ("vllm", "local", False, "adapter"),
}
PROMPTS = ["Write a short review of the movie Up.", "Review the film Heat in two sentences.",
           "What did you think of Alien?", "Describe the movie Arrival briefly."]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed A/B sampling rounds")
    parser.add_argument("--steps", type=int, default=5, help="GRPO steps per variant")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated GRPO rows among {', '.join(VARIANTS)} (default: all the engines allow)")
    args = parser.parse_args()
    engines = set(args.engines.split(","))
    args.variants = re.split(r",(?!\d)", args.variants) if args.variants else [
        name for name, (engine, *_) in VARIANTS.items() if engine in engines]
    unknown = sorted(set(args.variants) - VARIANTS.keys())
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "hf" not in args.variants:
        parser.error("--variants: the ratios are to the local hf row; keep 'hf' among them")
    args.engines = engines | {VARIANTS[name][0] for name in args.variants}
    return args


def prompts_of(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(count)]


def throughput(engines: dict, prompt_ids, args) -> dict[str, float]:
    """Median generated tokens per second of each engine over alternating rounds."""
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    for engine in engines.values():  # warm-up
        engine.generate(prompt_ids[:1], 2, SamplingParams(max_new_tokens=4, seed=0))
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            started = time.perf_counter()
            rollout = engine.generate(prompt_ids, args.group_size, sampling)
            rates[name].append(int(rollout.response_mask.sum()) / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def grpo_split(model_dir: str, variant: str, server_url: str | None, prompts: Path, args,
               out: Path) -> dict[str, float]:
    """Run GRPO as `variant`; the median step-time split over steps 2.. and the call's wall time."""
    import alignkit

    engine, placement, asynchronous, lora_sync = VARIANTS[variant]
    extra: dict = {"placement": placement, "async_rollout": asynchronous}
    if engine == "vllm":
        extra["rollout"] = "vllm"
        if lora_sync == "adapter":  # a server of its own, started with runtime LoRA
            extra.update(vllm_python=args.vllm_python, vllm_lora_sync="adapter")
        elif placement == "local":  # the bench's server; a split rollout worker starts its own
            extra["vllm_url"] = server_url
        else:
            extra["vllm_python"] = args.vllm_python
    started = time.perf_counter()
    result = alignkit.train("grpo", model=model_dir, data=str(prompts), output_dir=out, reward="vader",
                            batch_size=args.prompts, group_size=args.group_size, max_steps=args.steps,
                            max_new_tokens=args.max_new_tokens, lora_r=args.lora_r, progress=False,
                            overwrite=True, allow_degenerate=True, **extra)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()][1:]
    split = {key: statistics.median(m[key] for m in metrics if key in m)
             for key in STEP_KEYS if any(key in m for m in metrics)}  # the last step prefetches nothing
    return {**split, "train_call_s": wall}


def print_splits(splits: dict[str, dict[str, float]], args) -> None:
    keys = [key for key in (*STEP_KEYS, "train_call_s") if any(key in split for split in splits.values())]
    print(f"\nGRPO, {args.steps} steps, median over steps 2..{args.steps} (seconds; ratios to the local hf row):")
    print(f"  {'variant':19s}" + "".join(f"{key.split('/')[-1]:>13s}" for key in keys)
          + f"{'step/hf':>9s}{'call/hf':>9s}")
    base = splits["hf"]
    for name, split in splits.items():
        print(f"  {name:19s}" + "".join(f"{split.get(key, float('nan')):13.2f}" for key in keys)
              + f"{split['time/step_s'] / base['time/step_s']:9.2f}"
              + f"{split['train_call_s'] / base['train_call_s']:9.2f}")


def main() -> int:
    args = parse_args()
    if "vllm" in args.engines and not Path(args.vllm_python).exists():
        print(f"{args.vllm_python}: no vLLM environment (make vllm), or pass --engines hf", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    model_dir = save_pretrained_merged(model, tokenizer, work / "model")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in PROMPTS * 8))
    server = start_vllm_server(args.vllm_python, model_dir, work) if "vllm" in args.engines else None
    try:
        if server is not None:
            prompt_ids = prompts_of(tokenizer, args.prompts)
            engines = {"hf": HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)),
                       "vllm": HTTPEngine(server.url, pad_id=tokenizer.pad_token_id)}
            rates = throughput(engines, prompt_ids, args)
            print(f"sampling, {args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} tokens "
                  f"(threads {torch.get_num_threads()}):")
            for name, rate in rates.items():
                print(f"  {name:5s} {rate:8.1f} tokens/s")
            print(f"  vllm / hf = {rates['vllm'] / rates['hf']:.2f}x")
        splits = {name: grpo_split(str(model_dir), name, server.url if server else None, prompts, args,
                                   work / re.sub(r"[^\w.-]", "_", name))
                  for name in args.variants}
        print_splits(splits, args)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
