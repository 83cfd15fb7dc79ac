#!/usr/bin/env python3
"""Data-parallel scaling of the offline trainer: 1 process against 2 torchrun ranks (DDP and
FSDP2), the same global batch, side by side in one run.

    .venv/bin/python bench/scaling.py [--methods dpo,sft] [--rounds 2] [--steps 12]

Each configuration runs in fresh processes (`torchrun --nproc-per-node=2 bench/scaling.py
--worker ...` for two ranks). Reported per configuration:

- steps/s and tokens/s of the training loop (rank 0's end-of-step stamps, step 1 excluded);
- `comm share`: the time to all-reduce one float32 buffer as large as the trainable parameters
  (what DDP moves per step; FSDP2 moves about as much as reduce-scatter + all-gather), measured
  after training on the same process group, divided by the median step time. An upper bound:
  DDP overlaps its buckets with backward;
- `process s`: what a user's stopwatch sees, the whole command (torchrun, imports, model load,
  training, final save) at the thread count shown.

On this 2-core CPU box a 2-rank speed-up is not expected (two ranks share the two cores that one
process with two threads also uses); the numbers show the overhead. On GPUs the same script
runs with nccl. The loss of every configuration is printed too: they train the same numbers.
GRPO runs 2 prompts x 8 samples x 32 new tokens per step (the prompts of the pairs): each rank
samples its prompt groups, so generation splits across ranks too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    MARKER,
    WORKER_ENV,
    build_smollm2_shaped,
    child_env,
    count_tokens,
    emit_result,
    long_pairs,
    median_of,
    peak_rss_mib,
    print_table,
    train_alignkit,
)

# (label, ranks, strategy, threads per rank)
CONFIGS = [
    ("1 process, 1 thread", 1, "ddp", 1),
    ("1 process, 2 threads", 1, "ddp", 2),
    ("2 ranks ddp, 1 thread each", 2, "ddp", 1),
    ("2 ranks fsdp2, 1 thread each", 2, "fsdp2", 1),
]


def communication_probe(trainable: int, repeats: int = 5) -> float | None:
    """Median seconds to all-reduce `trainable` float32 values over the process group."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    buffer = torch.ones(trainable, dtype=torch.float32)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def worker(method: str, spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    rows = as_method_rows(method, [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()])
    if method == "grpo":
        result = train_grpo(spec, rows)
    else:
        result = train_alignkit(spec, method, rows, strategy=spec["strategy"])
    trainable = sum(_slice_numel(p) for p in _trained_model_params(spec["out"]))
    comm = communication_probe(trainable)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        result.update(comm_s=comm, comm_share=None if comm is None else comm / result["step_s_median"],
                      trainable=trainable, torch_threads=torch.get_num_threads())
        emit_result(result)
    import torch.distributed as dist

    if dist.is_initialized():  # leave together: a rank exiting first can abort its peer's teardown
        dist.barrier()
        dist.destroy_process_group()


def _trained_model_params(run_dir: str):
    from safetensors import safe_open

    with safe_open(str(Path(run_dir) / "final" / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            yield handle.get_slice(name)


def count_e(prompts, completions, **columns):
    """GRPO's rule reward here: +1 per letter e of the completion."""
    return [float(text.count("e")) for text in completions]


def train_grpo(spec: dict, rows: list[dict]) -> dict:
    """GRPO (8 samples per prompt, 32 new tokens, beta 0.04) timed per step like the offline
    methods; tokens/s counts prompt + generated tokens of every sample."""
    import alignkit

    stamps, losses, tokens = [], [], []

    def on_step(step: int, metrics: dict) -> None:
        stamps.append(time.perf_counter())
        losses.append(float(metrics["loss"]))
        tokens.append(float(metrics["throughput/tokens_per_s"]) * float(metrics["time/step_s"]))

    begin = time.perf_counter()
    alignkit.train("grpo", model=spec["model"], data=rows, output_dir=spec["out"], reward=count_e,
                   callbacks=(on_step,), batch_size=spec["batch_size"], max_steps=spec["steps"], lr=spec["lr"],
                   warmup_ratio=0.0, scheduler="constant", seed=spec["seed"], dtype="float32", device="cpu",
                   progress=False, group_size=8, max_new_tokens=32, beta=0.04, strategy=spec["strategy"])
    loop_s = stamps[-1] - stamps[0]
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"end_to_end_s": time.perf_counter() - begin, "steps_per_s": (len(stamps) - 1) / loop_s,
            "step_s_median": statistics.median(intervals), "tokens_per_s": sum(tokens[1:]) / loop_s,
            "final_loss": losses[-1], "peak_rss_loop_mib": peak_rss_mib()}


def as_method_rows(method: str, pairs: list[dict]) -> list[dict]:
    """The pairs as `method` trains on them (SFT: prompt + chosen; GRPO: the prompts)."""
    if method == "sft":
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]
    if method == "grpo":
        return [{"prompt": r["prompt"]} for r in pairs]
    return pairs


def run_config(script: Path, method: str, spec: dict, ranks: int, threads: int, out: Path) -> dict:
    path = out / f"spec-{method}-{ranks}-{spec['strategy']}-{threads}.json"
    path.write_text(json.dumps(spec))
    if ranks == 1:
        command = [sys.executable, str(script), "--worker", method, "--spec", str(path)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                   "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), "--worker", method,
                   "--spec", str(path)]
    env = {**os.environ, **WORKER_ENV, **child_env(threads, out), "GLOO_SOCKET_IFNAME": "lo"}
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method} x{ranks} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(MARKER):]), "process_wall_s": wall}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slice_numel(sliced) -> int:
    numel = 1
    for size in sliced.get_shape():
        numel *= size
    return numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--worker")
    parser.add_argument("--spec")
    parser.add_argument("--methods", default="dpo,sft,grpo")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.spec)
        return

    script = Path(__file__).resolve()
    out = Path(tempfile.mkdtemp(prefix="alignkit-scaling-"))
    model = build_smollm2_shaped(out / "model", hidden_size=args.hidden)
    data = out / "pairs.jsonl"
    pairs = long_pairs(args.batch_size * (args.steps + 2))
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    print(f"model: SmolLM2-shaped, hidden {args.hidden}, 4 layers, 49k vocabulary; batch {args.batch_size} "
          f"(global), {args.steps} steps, float32, {args.rounds} rounds; scratch {out}", flush=True)
    results: dict[tuple, list[dict]] = {}
    for method in args.methods.split(","):
        for r in range(args.rounds):
            order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
            for label, ranks, strategy, threads in order:
                spec = {"model": str(model), "data": str(data), "out": str(out / f"run-{method}-{len(results)}-{r}"),
                        "batch_size": args.batch_size if method != "grpo" else max(2, args.batch_size // 4), "steps": args.steps, "lr": 1e-4, "max_length": 512,
                        "max_prompt_length": 256, "lora_r": 0, "seed": 0, "strategy": strategy,
                        "tokens_per_example": 0 if method == "grpo" else count_tokens(
                            as_method_rows(method, pairs), tokenizer, 512, 256)["tokens_per_example"]}
                result = run_config(script, method, spec, ranks, threads, out)
                results.setdefault((method, label), []).append(result)
                print(f"round {r + 1} {method} {label}: {result['steps_per_s']:.3f} steps/s, "
                      f"process {result['process_wall_s']:.1f} s", flush=True)
    for method in args.methods.split(","):
        base = median_of(results[(method, CONFIGS[0][0])], "steps_per_s")
        rows = []
        for label, *_ in CONFIGS:
            runs = results[(method, label)]
            steps = median_of(runs, "steps_per_s")
            rows.append([label, steps, median_of(runs, "tokens_per_s"), None if not base else steps / base,
                         median_of(runs, "comm_share"), median_of(runs, "peak_rss_loop_mib"),
                         median_of(runs, "process_wall_s"), median_of(runs, "final_loss")])
        print_table(["configuration", "steps/s", "tokens/s", "vs 1x1", "comm share", "peak MiB/rank", "process s",
                     "final loss"],
                    rows,
                    title=f"{method}: training loop (rank 0) and whole process")


if __name__ == "__main__":
    main()
