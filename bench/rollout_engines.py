"""Rollout engines side by side: alignkit's in-process HFEngine vs a vLLM server (over HTTP),
and a GRPO step's time split with each, synchronous and one-step-off asynchronous.

1. Sampling throughput: `--prompts` prompts x `--group-size` samples of exactly
   `--max-new-tokens` tokens (EOS ignored), temperature 1, A/B rounds alternating, medians.
2. GRPO steps on the same prompts: `--rollout hf`, `--rollout vllm`, `--rollout vllm` with
   `--set async_rollout=true`; the median of each step-time part over the steps after the first
   (time/generation_s, time/scoring_s, time/logprobs_s, time/training_s, time/step_s; with async,
   async/wait_s and async/overlap_s), and the whole train call's wall time.

Ratios are what to read (the machine is shared): vLLM/HF tokens per second, and each GRPO
variant's step time over the hf one. Needs .venv-vllm (make vllm).

    python bench/rollout_engines.py                       # SmolLM2-135M (embedded)
    python bench/rollout_engines.py --model DIR --steps 6
"""

from __future__ import annotations

import argparse
import json
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
STEP_KEYS = ("time/generation_s", "time/scoring_s", "time/logprobs_s", "time/training_s", "time/step_s",
             "async/wait_s", "async/overlap_s")


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
    return parser.parse_args()


def prompts_of(tokenizer, count: int) -> list[list[int]]:
    texts = ["Write a short review of the movie Up.", "Review the film Heat in two sentences.",
             "What did you think of Alien?", "Describe the movie Arrival briefly."]
    return [tokenizer.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}],
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


def grpo_split(model_dir: str, url: str | None, asynchronous: bool, args, out: Path) -> dict[str, float]:
    import alignkit

    rows = [{"prompt": text} for text in ["Write a short review of the movie Up.",
                                           "Review the film Heat in two sentences.",
                                           "What did you think of Alien?", "Describe the movie Arrival."] * 8]
    extra = {"rollout": "vllm", "vllm_url": url} if url else {}
    if asynchronous:
        extra["async_rollout"] = True
    started = time.perf_counter()
    result = alignkit.train("grpo", model=model_dir, data=rows, output_dir=out, reward="vader",
                            batch_size=args.prompts, group_size=args.group_size, max_steps=args.steps,
                            max_new_tokens=args.max_new_tokens, lora_r=args.lora_r, progress=False,
                            overwrite=True, allow_degenerate=True, **extra)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()][1:]
    split = {key: statistics.median(m[key] for m in metrics if key in m)
             for key in STEP_KEYS if any(key in m for m in metrics)}  # the last step prefetches nothing
    return {**split, "train_call_s": wall}


def main() -> int:
    args = parse_args()
    if not Path(args.vllm_python).exists():
        print(f"{args.vllm_python}: no vLLM environment (make vllm)", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    model_dir = save_pretrained_merged(model, tokenizer, work / "model")
    server = start_vllm_server(args.vllm_python, model_dir, work)
    try:
        prompt_ids = prompts_of(tokenizer, args.prompts)
        engines = {"hf": HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,)),
                   "vllm": HTTPEngine(server.url, pad_id=tokenizer.pad_token_id)}
        rates = throughput(engines, prompt_ids, args)
        print(f"sampling, {args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} tokens "
              f"(threads {torch.get_num_threads()}):")
        for name, rate in rates.items():
            print(f"  {name:5s} {rate:8.1f} tokens/s")
        print(f"  vllm / hf = {rates['vllm'] / rates['hf']:.2f}x")
        variants = {"hf": (None, False), "vllm": (server.url, False), "vllm+async": (server.url, True)}
        splits = {name: grpo_split(str(model_dir), url, asynchronous, args, work / name.replace("+", "_"))
                  for name, (url, asynchronous) in variants.items()}
        keys = [key for key in (*STEP_KEYS, "train_call_s") if any(key in split for split in splits.values())]
        print(f"\nGRPO, {args.steps} steps, median over steps 2..{args.steps} (seconds; ratio to hf step time):")
        print(f"  {'variant':11s}" + "".join(f"{key.split('/')[-1]:>14s}" for key in keys) + f"{'step/hf':>9s}")
        for name, split in splits.items():
            ratio = split["time/step_s"] / splits["hf"]["time/step_s"]
            print(f"  {name:11s}" + "".join(f"{split.get(key, float('nan')):14.2f}" for key in keys)
                  + f"{ratio:9.2f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
