"""Helpers shared by the side-by-side benchmarks: child-process workers, alternating A/B
rounds, memory readings, the synthetic long-pair data, per-step timing of `alignkit.train`
and a plain-text ratio table.

A benchmark script runs each framework in a fresh child (`python SCRIPT --worker NAME --spec
FILE`) so imports, allocator state and peak RSS never leak from one framework into the other.
The child prints one line `BENCH_RESULT {json}` as its last result line; `run_worker` parses it.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MARKER = "BENCH_RESULT "
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "WANDB_DISABLED": "true",
}


# --------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident set size of this process now (from /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


# --------------------------------------------------------------------------- workers


def emit_result(result: dict) -> None:
    """Child side: print the result line the parent looks for."""
    sys.stdout.flush()
    print(MARKER + json.dumps(result), flush=True)


def run_worker(script: str | Path, name: str, spec: str | Path, *, timeout: float | None = None,
               env: dict[str, str] | None = None, verbose: bool = False) -> dict:
    """Parent side: run `SCRIPT --worker NAME --spec SPEC` in a fresh interpreter; its result."""
    cmd = [sys.executable, str(script), "--worker", name, "--spec", str(spec)]
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    wall = time.perf_counter() - started
    if verbose and proc.stderr.strip():
        print(proc.stderr.rstrip(), file=sys.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"worker {name!r} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(MARKER):])
    result.setdefault("process_wall_s", wall)
    return result


def ab_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Run order per round: forward, then reversed, alternating, so a drifting load (or a warm
    page cache) does not favour whichever framework always goes first."""
    names = list(names)
    return [names if r % 2 == 0 else names[::-1] for r in range(rounds)]


def run_rounds(names: Sequence[str], rounds: int, run_one: Callable[[str, int], dict],
               log: Callable[[str], None] = print, keep_going: bool = False) -> dict[str, list[dict]]:
    """Call `run_one(name, round)` in alternating A/B order; results grouped by name. With
    `keep_going`, a failed child is recorded as `{"error": message}` (and not retried in later
    rounds) instead of stopping the whole benchmark."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    failed: set[str] = set()
    for r, order in enumerate(ab_orders(names, rounds)):
        for name in order:
            if name in failed:
                continue
            log(f"round {r + 1}/{rounds}: {name} ...")
            try:
                result = run_one(name, r)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                if not keep_going:
                    raise
                failed.add(name)
                result = {"error": str(error)}
                log("  FAILED: " + str(error).strip().splitlines()[-1][:300])
                results[name].append(result)
                continue
            results[name].append(result)
            log(f"  {summarise(result)}")
    return results


def first_error(results: list[dict]) -> str | None:
    """The last line of the first recorded failure among a name's results, if any."""
    for result in results:
        if "error" in result:
            lines = str(result["error"]).strip().splitlines()
            return lines[-1] if lines else "failed"
    return None


def summarise(result: dict) -> str:
    keys = ("steps_per_s", "tokens_per_s", "end_to_end_s", "peak_rss_mib", "final_loss")
    return ", ".join(f"{k}={result[k]:.4g}" for k in keys if isinstance(result.get(k), int | float))


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


def unpaired_from_pairs(pairs: list[dict]) -> list[dict]:
    """KTO rows from pairs: chosen -> label True, rejected -> label False, interleaved, so each
    batch of 2B rows holds exactly the 2B sequences of B pairs (and both labels)."""
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def example_sequences(row: dict) -> list[tuple[str, str]]:
    """(prompt, response) of every sequence an example trains on, whatever its shape."""
    if "chosen" in row:
        return [(row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])]
    if "completions" in row:
        return [(row["prompt"], c) for c in row["completions"]]
    return [(row["prompt"], row["completion"])]


def count_tokens(rows: list[dict], tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Real tokens per example (every sequence: prompt + response + eos), capped as trained.
    For pairs `tokens_per_pair` = `tokens_per_example`."""

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    per_example, seqs, truncated = [], [], 0
    for row in rows:
        total = 0
        for prompt, response in example_sequences(row):
            full = min(n(prompt), max_prompt_length) + n(response) + 1
            truncated += full > max_length
            seqs.append(min(full, max_length))
            total += seqs[-1]
        per_example.append(total)
    mean = statistics.mean(per_example)
    return {
        "tokens_per_example": mean,
        "tokens_per_pair": mean,
        "sequences_per_example": len(seqs) / len(rows),
        "seq_len_min": min(seqs),
        "seq_len_median": statistics.median(seqs),
        "seq_len_max": max(seqs),
        "truncated_sequences": truncated,
    }


# --------------------------------------------------------------------------- timing


def loop_stats(stamps: list[float], losses: list[float], spec: dict) -> dict:
    """Steps/s and tokens/s from the end-of-step timestamps, step 1 excluded. Tokens per step =
    mean real tokens per example x batch size (examples = pairs, unpaired rows or ranked rows)."""
    measured = len(stamps) - 1
    loop_s = stamps[-1] - stamps[0] if measured > 0 else float("nan")
    per_example = spec.get("tokens_per_example", spec.get("tokens_per_pair"))
    tokens = per_example * spec["batch_size"] * measured
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "steps": len(stamps),
        "loop_s": loop_s,
        "steps_per_s": measured / loop_s,
        "step_s": loop_s / measured,
        # robust to a stall while another process holds the core (shared machines)
        "step_s_median": statistics.median(intervals) if intervals else float("nan"),
        "tokens_per_s": tokens / loop_s,
        "tokens_per_step": per_example * spec["batch_size"],
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": statistics.mean(losses) if losses else None,
    }


def train_alignkit(spec: dict, method: str, rows: list[dict], hparams: dict | None = None,
                   **extra) -> dict:
    """`alignkit.train(method, ...)` on the spec's model and sizes (float32, CPU, linear decay,
    no warm-up), timed per optimizer step by a callback: import, end-to-end and loop stats."""
    started = time.perf_counter()
    import alignkit
    import alignkit.training.offline.loop  # noqa: F401  (alignkit imports lazily)

    import_s = time.perf_counter() - started
    stamps, losses, peaks = [], [], []

    def on_step(step: int, metrics: dict) -> None:
        stamps.append(time.perf_counter())
        peaks.append(peak_rss_mib())
        losses.append(float(metrics["loss"]))

    begin = time.perf_counter()
    alignkit.train(
        method, model=spec["model"], data=rows, output_dir=spec["out"], callbacks=(on_step,),
        batch_size=spec["batch_size"], max_steps=spec["steps"], lr=spec["lr"],
        max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"],
        warmup_ratio=0.0, scheduler="linear", lora_r=spec["lora_r"], seed=spec["seed"],
        dtype="float32", device="cpu", progress=False, **extra, **(hparams or {}),
    )
    end_to_end = time.perf_counter() - begin
    if len(stamps) < 2:
        raise RuntimeError(f"{method}: only {len(stamps)} step(s) ran; need >= 2 to time the loop")
    return {"import_s": import_s, "end_to_end_s": end_to_end, **loop_stats(stamps, losses, spec),
            "peak_rss_step1_mib": peaks[0], "peak_rss_loop_mib": peaks[-1]}


def child_env(threads: int, out: Path) -> dict[str, str]:
    """Environment of a worker child: its own datasets cache, pinned BLAS/OpenMP threads."""
    env = {"HF_DATASETS_CACHE": str(out / "hf-datasets")}
    if threads > 0:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


# --------------------------------------------------------------------------- aggregation


def median_of(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return format(value, spec)


def print_table(header: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> None:
    """Left-aligned first column, right-aligned others."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(values):
        first = str(values[0]).ljust(widths[0])
        rest = [str(v).rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    if title:
        print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


# --------------------------------------------------------------------------- models

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_VOCAB = 49152


def smollm2_dir() -> Path | None:
    """The cached SmolLM2-135M-Instruct safetensors directory, if it is there (never converts)."""
    from alignkit.models.loading import cache_dir

    path = Path(cache_dir()) / "smollm2-135m-instruct"
    return path if (path / "config.json").exists() and (path / "model.safetensors").exists() else None


def build_smollm2_shaped(path: str | Path, *, hidden_size: int = 256, num_layers: int = 4,
                         num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0) -> Path:
    """A random Llama with SmolLM2-135M's shape (49,152-token vocabulary, tied embeddings, GQA,
    SiLU MLP of 8/3 x hidden, rope theta 1e5) but narrower and shallower, saved with a tokenizer.

    Tokenizer: SmolLM2's own when its cache directory exists (`smollm2_dir()`), so prompts and
    completions tokenise as with the real model; otherwise alignkit's tiny BPE tokenizer padded
    with 49k inert added tokens `<x_i>` up to the vocabulary size (every id decodes to text).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    source = smollm2_dir()
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        from alignkit.testing import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        tokenizer.add_tokens([f"<x_{i}>" for i in range(SMOLLM2_VOCAB - len(tokenizer))])
    intermediate = -(-hidden_size * 8 // 3 // 64) * 64  # 8/3 x hidden rounded up to 64 (576 -> 1536)
    config = LlamaConfig(
        vocab_size=max(SMOLLM2_VOCAB, len(tokenizer)), hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
