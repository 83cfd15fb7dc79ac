"""`alignkit demo`: align SmolLM2-135M-Instruct towards positive movie reviews, two ways.

1. load the embedded model and the built-in movie-review prompts (train / held-out split)
2. evaluate the base model on held-out prompts: gold reward (VADER), length, diversity
3. GRPO with LoRA, rewarded online by VADER; evaluate it (gold reward, KL to the base, win rate)
4. DPO with LoRA on self-generated pairs (per training prompt the most and the least positive of
   a few samples); evaluate it the same way
5. write the report (report.html, PNGs, results.json) and print the table

Memory: a step's activations for backward grow with the tokens in one forward (about 2 MB
per token for SmolLM2-135M with LoRA on every linear layer: 30 layers x ~16k floats), so
GRPO's 32 samples and DPO's 8 pairs (16 sequences) are trained in micro-batches of
`grpo_micro_batch_size` samples and `dpo_micro_batch_size` pairs -- the same update, since
losses are normalised by the step's global counts -- which keeps the whole demo under 2 GB.
results.json records the peak RSS (`peak_rss_mb`, and the peak reached by the end of each
stage, `stage_peak_rss_mb`).
"""

from __future__ import annotations

import gc
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignkit.data import builtin_prompts
from alignkit.lab import evaluate_model
from alignkit.lab.generation_eval import encode_prompts, sample

log = logging.getLogger("alignkit")
METHODS = ("grpo", "dpo")


@dataclass
class DemoOptions:
    """`alignkit demo` options; the defaults finish in about 9 minutes on 2 CPU cores, under 2 GB."""

    output: str = "alignkit-demo"
    """Directory for the report, results.json and each method's run with its final/ model."""
    model: str = "smollm2-135m"
    """Policy to align: the embedded default, a local directory or a hub id."""
    methods: tuple[str, ...] = METHODS
    """Which alignment methods to run (grpo, dpo)."""
    train_prompts: int = 64
    """Training prompts."""
    eval_prompts: int = 25
    """Held-out prompts used to score every model."""
    eval_samples: int = 6
    """Samples per held-out prompt."""
    max_new_tokens: int = 32
    """Length limit of every generated review."""
    eval_temperature: float = 0.7
    """Sampling temperature when scoring a model (the same for every model)."""
    lora_r: int = 16
    """LoRA rank for both methods."""
    grpo_steps: int = 8
    """GRPO optimizer steps."""
    grpo_prompts_per_step: int = 8
    """Prompts per GRPO step."""
    grpo_group_size: int = 4
    """Samples per prompt in a GRPO group."""
    grpo_lr: float = 7e-4
    """GRPO learning rate for the LoRA adapter."""
    grpo_beta: float = 0.02
    """GRPO KL coefficient (k3 in the loss; the reference is the base with the adapter off)."""
    grpo_micro_batch_size: int = 2
    """Samples per GRPO forward/backward; the step's samples are accumulated (memory, not math)."""
    dpo_samples_per_prompt: int = 4
    """Reviews sampled per training prompt; the best and the worst by VADER form its pair."""
    dpo_epochs: float = 2.0
    """DPO passes over the pairs."""
    dpo_batch_size: int = 8
    """Pairs per DPO step."""
    dpo_micro_batch_size: int = 1
    """Pairs per DPO forward/backward (divides dpo_batch_size); accumulated to a step."""
    dpo_lr: float = 5e-4
    """DPO learning rate for the LoRA adapter."""
    dpo_beta: float = 0.1
    """DPO inverse temperature."""
    seed: int = 0
    """Seed for sampling and training."""
    progress: bool = True
    """Show progress bars."""
    threads: int = 0
    """torch CPU threads (0: one per core, fewer when other processes already load the cores)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, about a third more training compute)."""


def load_prompts() -> dict[str, list[str]]:
    """The built-in prompt set shipped as package data: {'train': [...], 'heldout': [...]}
    (`alignkit.data.builtin_prompts`, which `alignkit eval/overopt --prompts builtin` use)."""
    return builtin_prompts()


def as_chat(prompts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def build_pairs(prompts: list[str], groups: list[list[str]], reward) -> tuple[list[dict], int]:
    """Best-versus-worst pair per prompt under the gold reward ("max_min", Dong et al. 2024).

    Prompts whose samples all score the same give no preference: they are counted and left out.
    """
    pairs, ties = [], 0
    flat_prompts = [p for p, group in zip(prompts, groups, strict=True) for _ in group]
    scores = reward(flat_prompts, [c for group in groups for c in group]).tolist()
    start = 0
    for prompt, group in zip(prompts, groups, strict=True):
        group_scores = scores[start : start + len(group)]
        start += len(group)
        best = max(range(len(group)), key=group_scores.__getitem__)
        worst = min(range(len(group)), key=group_scores.__getitem__)
        if group_scores[best] == group_scores[worst] or group[best] == group[worst]:
            ties += 1
            continue
        pairs.append({"prompt": as_chat([prompt])[0],
                      "chosen": [{"role": "assistant", "content": group[best]}],
                      "rejected": [{"role": "assistant", "content": group[worst]}]})
    return pairs, ties


def release_free_memory(*_args) -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`; elsewhere nothing).

    torch's CPU tensors below glibc's mmap threshold live on the heap, whose holes a long
    forward/backward leaves behind stay resident: trimming after every optimizer step keeps a
    step's peak from stacking on the previous steps' leftovers (and the final save's copy of the
    weights on top of them). Takes `(step, metrics)` so it can be a training callback."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory so far, MiB: this process (`self`) and its largest finished child
    (`children`), from getrusage (ru_maxrss is KiB on Linux)."""
    return {who: resource.getrusage(which).ru_maxrss / 1024
            for who, which in (("self", resource.RUSAGE_SELF), ("children", resource.RUSAGE_CHILDREN))}


class StageClock:
    """Seconds spent in each step and the peak RSS reached by its end, logged as each ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.current: tuple[str, float] | None = None

    def start(self, name: str, message: str, *args) -> None:
        self.stop()
        log.info(message, *args)
        self.current = (name, time.perf_counter())

    def stop(self) -> None:
        if self.current is not None:
            name, began = self.current
            gc.collect()  # a finished stage's model (peft graphs hold cycles) goes before the next loads
            release_free_memory()
            self.seconds[name] = time.perf_counter() - began
            self.peak_rss_mb[name] = peak_rss_mb()["self"]
            log.info("      done in %.0f s (peak RSS so far %.0f MB)", self.seconds[name], self.peak_rss_mb[name])
            self.current = None


def train_grpo(options: DemoOptions, prompts: list[str], reward, output: Path):
    from alignkit.api import train
    from alignkit.models import load_model

    model, tokenizer = load_model(options.model)
    steps, per_step = options.grpo_steps, options.grpo_prompts_per_step
    data = [{"prompt": chat} for chat in as_chat(prompts)]
    return train(
        "grpo", model=model, tokenizer=tokenizer, data=data, reward=reward, output_dir=output / "grpo",
        batch_size=per_step, max_steps=steps, lr=options.grpo_lr, lora_r=options.lora_r, seed=options.seed,
        warmup_ratio=0.0, progress=options.progress, threads=options.threads,
        gradient_checkpointing=options.gradient_checkpointing, group_size=options.grpo_group_size,
        max_new_tokens=options.max_new_tokens, beta=options.grpo_beta, temperature=1.0,
        micro_batch_size=options.grpo_micro_batch_size, allow_degenerate=True,  # the report judges it
        callbacks=(release_free_memory,),
        overwrite=True,  # a re-run of the demo replaces its previous runs
    )


def train_dpo(options: DemoOptions, prompts: list[str], reward, output: Path):
    from alignkit.api import train
    from alignkit.models import load_model

    model, tokenizer = load_model(options.model)
    groups = sample(model, tokenizer, encode_prompts(tokenizer, prompts), options.dpo_samples_per_prompt,
                    max_new_tokens=options.max_new_tokens, temperature=1.0, seed=options.seed + 2).texts
    pairs, ties = build_pairs(prompts, groups, reward)
    log.info("      %d pairs (%d prompts left out: all their samples scored the same)", len(pairs), ties)
    micro, accumulate = dpo_micro_batches(options)
    result = train(
        "dpo", model=model, tokenizer=tokenizer, data=pairs, output_dir=output / "dpo",
        batch_size=micro, grad_accum=accumulate, epochs=options.dpo_epochs, lr=options.dpo_lr,
        lora_r=options.lora_r, seed=options.seed, max_length=256, warmup_ratio=0.1, progress=options.progress,
        threads=options.threads, gradient_checkpointing=options.gradient_checkpointing, allow_degenerate=True,
        beta=options.dpo_beta, callbacks=(release_free_memory,),
        overwrite=True,  # a re-run of the demo replaces its previous runs
    )
    return result, {"pairs": len(pairs), "pairs_left_out": ties}


def dpo_micro_batches(options: DemoOptions) -> tuple[int, int]:
    """(pairs per forward/backward, micro-batches per step) for `dpo_batch_size` pairs a step."""
    micro = max(1, min(options.dpo_micro_batch_size, options.dpo_batch_size))
    if options.dpo_batch_size % micro:
        raise ValueError(f"--dpo-micro-batch-size {micro} must divide --dpo-batch-size {options.dpo_batch_size}")
    return micro, options.dpo_batch_size // micro


def evaluate(model, tokenizer, prompts, options: DemoOptions, reward, embedder, *, reference, base=None):

    return evaluate_model(
        model, tokenizer, as_chat(prompts), reward=reward, reference=reference, samples=options.eval_samples,
        max_new_tokens=options.max_new_tokens, temperature=options.eval_temperature, seed=options.seed + 1,
        embedder=embedder, reference_completions=base, n_examples=2,
    )


def run_demo(options: DemoOptions) -> dict:
    """Run the five steps in the module docstring; return the results dict."""
    from alignkit.eval import format_table, intervals_overlap
    from alignkit.eval.diversity import default_embedder
    from alignkit.eval.report import curve_from_metrics, write_report
    from alignkit.models import load_model
    from alignkit.rewards import VaderSentiment
    from alignkit.training.run.threads import configure_threads

    unknown = set(options.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown demo method(s) {sorted(unknown)}; choose from {METHODS}")
    dpo_micro_batches(options)  # a bad split fails now, not after GRPO
    configure_threads(options)
    started = time.perf_counter()
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    reward, clock = VaderSentiment(), StageClock()

    # 1. model and prompts
    clock.start("load", "[1/5] loading %s and the built-in prompts", options.model)
    model, tokenizer = load_model(options.model)
    prompts = load_prompts()
    train_prompts = prompts["train"][: options.train_prompts]
    eval_prompts = prompts["heldout"][: options.eval_prompts]
    embedder = default_embedder()

    # 2. the base model
    clock.start("eval_base", "[2/5] evaluating the base model on %d held-out prompts", len(eval_prompts))
    methods = {"base": evaluate(model, tokenizer, eval_prompts, options, reward, embedder, reference=None)}
    base_completions = methods["base"]["completions"]
    del model

    # 3.-4. each alignment method, then its evaluation against the base
    extras: dict[str, dict] = {}
    for step, name in enumerate(options.methods, start=3):
        clock.start(f"train_{name}", "[%d/5] training %s with LoRA (r=%d)", step, name.upper(), options.lora_r)
        if name == "grpo":
            result = train_grpo(options, train_prompts, reward, output)
            curve = curve_from_metrics(result.output_dir / "metrics.jsonl")
        else:
            result, extras[name] = train_dpo(options, train_prompts, reward, output)
            curve = curve_from_metrics(result.output_dir / "metrics.jsonl", reward_key="rewards/margins")
        clock.start(f"eval_{name}", "      evaluating %s", name.upper())
        methods[name] = evaluate(result.model, tokenizer, eval_prompts, options, reward, embedder,
                                 reference="adapter", base=base_completions)
        methods[name]["curve"] = curve
        methods[name]["final"] = str(result.final_dir)
        del result
    clock.stop()

    # 5. report
    base_ci = (methods["base"]["ci_low"], methods["base"]["ci_high"])
    beats_base = {name: bool(methods[name]["gold_reward"] > methods["base"]["gold_reward"]
                             and not intervals_overlap(base_ci, (methods[name]["ci_low"], methods[name]["ci_high"])))
                  for name in options.methods}
    results = {
        "title": "alignkit demo: positive movie reviews",
        "task": "short movie reviews; gold reward = VADER compound sentiment in [-1, 1]",
        "model": options.model,
        "methods": methods,
        "beats_base_with_separated_intervals": beats_base,
        "extras": extras,
        "seconds": time.perf_counter() - started,
        "stage_seconds": clock.seconds,
        "peak_rss_mb": peak_rss_mb()["self"],
        "peak_rss_children_mb": peak_rss_mb()["children"],
        "stage_peak_rss_mb": clock.peak_rss_mb,
        "torch_threads": torch.get_num_threads(),
        "options": asdict(options),
        "notes": [f"{len(eval_prompts)} held-out prompts x {options.eval_samples} samples per model, "
                  f"temperature {options.eval_temperature}; intervals: 95% bootstrap over prompts",
                  "KL: sampled KL(policy || base), k1 summed over response tokens"],
    }
    paths = write_report(results, output)
    print_summary(results, format_table)
    print(f"\nreport: {paths.get('report.html', output / 'report.html')}  |  {results['seconds']:.0f} s"
          f"  |  peak RSS {results['peak_rss_mb']:.0f} MB")
    return results


def print_summary(results: dict, format_table) -> None:
    rows = []
    for name, r in results["methods"].items():
        kl = r.get("kl")
        rows.append({
            "method": name, "VADER": f"{r['gold_reward']:+.3f}", "95% CI": f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
            "KL": "-" if kl is None else f"{kl:.2f}", "win rate": "-" if r.get("win_rate") is None else f"{r['win_rate']:.2f}",
            "length": f"{r['mean_length_words']:.1f}",
            "distinct-2": f"{r['diversity']['across_input'].get('distinct_2', float('nan')):.2f}" if r.get("diversity") else "-",
        })
    print()
    print(format_table(rows, ["method", "VADER", "95% CI", "KL", "win rate", "length", "distinct-2"]))
    for name, r in results["methods"].items():
        for example in r.get("samples", [])[:2]:
            print(f"\n[{name}] {example['prompt']}\n  -> {example['completion']!r} (VADER {example['reward']:+.3f})")


def main(argv: list[str]) -> int:
    import tyro

    run_demo(tyro.cli(DemoOptions, args=argv, prog="alignkit demo"))
    return 0
