"""`alignkit demo`: align SmolLM2-135M-Instruct towards positive movie reviews with DPO.

1. load the embedded model and the built-in movie-review prompts (train / held-out split)
2. score the base model on held-out prompts with the gold reward (VADER compound sentiment)
3. sample reviews for each training prompt; the most positive (VADER) is chosen, the least
   positive rejected
4. train DPO with LoRA on those self-generated pairs
5. score the aligned model on the same held-out prompts; print and save the comparison
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger("alignkit")


@dataclass
class DemoOptions:
    """`alignkit demo` options; defaults finish within 10 minutes on 2 CPU cores."""

    output: str = "alignkit-demo"
    """Directory for results.json, the DPO run and its final/ checkpoint."""
    model: str = "smollm2-135m"
    """Policy to align: the embedded default, a local directory or a hub id."""
    train_prompts: int = 100
    """Training prompts (each gives one self-generated pair)."""
    samples_per_prompt: int = 4
    """Reviews sampled per training prompt; the best and the worst by VADER form its pair."""
    eval_prompts: int = 25
    """Held-out prompts used to score the model before and after."""
    eval_samples: int = 8
    """Samples per held-out prompt."""
    max_new_tokens: int = 40
    """Length limit of every generated review."""
    temperature: float = 1.0
    """Sampling temperature for the training pairs."""
    eval_temperature: float = 0.7
    """Sampling temperature when scoring a model (the same before and after)."""
    epochs: float = 2.0
    """DPO passes over the pairs."""
    batch_size: int = 8
    """Pairs per DPO step."""
    lr: float = 5e-4
    """DPO learning rate for the LoRA adapter."""
    beta: float = 0.1
    """DPO inverse temperature."""
    lora_r: int = 16
    """LoRA rank."""
    seed: int = 0
    """Seed for sampling and training."""
    progress: bool = True
    """Show progress bars."""


def load_prompts() -> dict[str, list[str]]:
    """The built-in prompt set shipped as package data: {'train': [...], 'heldout': [...]}."""
    text = resources.files("alignkit").joinpath("assets/movie_review_prompts.json").read_text()
    return json.loads(text)


def render_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Chat-template token ids of each user prompt, ready for generation."""
    messages = [[{"role": "user", "content": p}] for p in prompts]
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def sample_completions(
    model, tokenizer, prompts: list[str], n: int, options: DemoOptions, seed: int, temperature: float
):
    """n sampled completions per prompt, as text, grouped prompt by prompt."""
    from alignkit.rollout import HFEngine, SamplingParams

    eos_ids = tuple({tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids("<|endoftext|>")} - {None})
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids, max_batch_size=64)
    sampling = SamplingParams(
        max_new_tokens=options.max_new_tokens,
        temperature=temperature,
        stop_token_ids=eos_ids,
        seed=seed,
    )
    rollout = engine.generate(render_prompts(tokenizer, prompts), n, sampling)
    texts = []
    for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True):
        texts.append(tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True).strip())
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def score_model(model, tokenizer, prompts: list[str], options: DemoOptions, reward) -> dict:
    """Gold reward with a 95% bootstrap interval, mean length and two samples."""
    from alignkit.eval import bootstrap_ci

    groups = sample_completions(
        model, tokenizer, prompts, options.eval_samples, options, options.seed + 1, options.eval_temperature
    )
    flat_prompts = [p for p, group in zip(prompts, groups, strict=True) for _ in group]
    flat = [c for group in groups for c in group]
    scores = reward(flat_prompts, flat).tolist()
    mean, low, high = bootstrap_ci(scores, confidence=0.95, seed=options.seed)
    return {
        "gold_reward": mean,
        "ci_low": low,
        "ci_high": high,
        "mean_length_words": sum(len(c.split()) for c in flat) / len(flat),
        "n": len(flat),
        "samples": [{"prompt": flat_prompts[i], "completion": flat[i], "reward": scores[i]} for i in (0, 1)],
    }


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
        pairs.append(
            {"prompt": [{"role": "user", "content": prompt}],
             "chosen": [{"role": "assistant", "content": group[best]}],
             "rejected": [{"role": "assistant", "content": group[worst]}]}
        )
    return pairs, ties


class StageClock:
    """Seconds spent in each numbered step, logged as each one ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: tuple[str, float] | None = None

    def start(self, name: str, message: str, *args) -> None:
        self.stop()
        log.info(message, *args)
        self.current = (name, time.perf_counter())

    def stop(self) -> None:
        if self.current is not None:
            name, began = self.current
            self.seconds[name] = time.perf_counter() - began
            log.info("      done in %.0f s", self.seconds[name])
            self.current = None


def run_demo(options: DemoOptions) -> dict:
    """Run the five steps in the module docstring; return the results dict."""
    from alignkit.api import train
    from alignkit.eval import format_table, intervals_overlap
    from alignkit.models import load_model
    from alignkit.rewards import VaderSentiment

    started = time.perf_counter()
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    reward = VaderSentiment()
    clock = StageClock()

    # 1. model and prompts
    clock.start("load", "[1/5] loading %s", options.model)
    model, tokenizer = load_model(options.model)
    prompts = load_prompts()
    train_prompts = prompts["train"][: options.train_prompts]
    eval_prompts = prompts["heldout"][: options.eval_prompts]

    # 2. the base model on held-out prompts
    clock.start("score_base", "[2/5] scoring the base model on %d held-out prompts", len(eval_prompts))
    before = score_model(model, tokenizer, eval_prompts, options, reward)

    # 3. self-generated pairs labelled by the gold reward
    n = options.samples_per_prompt
    clock.start("sample_pairs", "[3/5] sampling %d reviews for each of %d training prompts", n, len(train_prompts))
    groups = sample_completions(model, tokenizer, train_prompts, n, options, options.seed + 2, options.temperature)
    pairs, ties = build_pairs(train_prompts, groups, reward)
    log.info("      %d pairs (%d prompts left out: all their samples scored the same)", len(pairs), ties)

    # 4. DPO with LoRA
    clock.start("train_dpo", "[4/5] training DPO with LoRA (r=%d) on %d pairs", options.lora_r, len(pairs))
    result = train(
        "dpo",
        model=model,
        tokenizer=tokenizer,
        data=pairs,
        output_dir=output / "dpo",
        batch_size=options.batch_size,
        epochs=options.epochs,
        lr=options.lr,
        lora_r=options.lora_r,
        seed=options.seed,
        max_length=256,
        warmup_ratio=0.1,
        progress=options.progress,
        beta=options.beta,
    )

    # 5. the aligned model on the same held-out prompts
    clock.start("score_dpo", "[5/5] scoring the DPO model")
    after = score_model(result.model, tokenizer, eval_prompts, options, reward)
    clock.stop()
    separated = not intervals_overlap((before["ci_low"], before["ci_high"]), (after["ci_low"], after["ci_high"]))
    results = {
        "task": "movie reviews, gold reward = VADER compound sentiment",
        "model": options.model,
        "methods": {"base": before, "dpo": after},
        "dpo_final": str(result.final_dir),
        "pairs": len(pairs),
        "pairs_left_out": ties,
        "train_metrics": result.metrics,
        "improved_with_separated_intervals": bool(after["gold_reward"] > before["gold_reward"] and separated),
        "seconds": time.perf_counter() - started,
        "stage_seconds": clock.seconds,
        "options": asdict(options),
    }
    (output / "results.json").write_text(json.dumps(results, indent=2))
    rows = [
        {"method": name, "VADER": f"{r['gold_reward']:+.3f}", "95% CI": f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
         "length (words)": f"{r['mean_length_words']:.1f}", "n": r["n"]}
        for name, r in results["methods"].items()
    ]
    print()
    print(format_table(rows, ["method", "VADER", "95% CI", "length (words)", "n"]))
    for name, r in results["methods"].items():
        for sample in r["samples"]:
            print(f"\n[{name}] {sample['prompt']}\n  -> {sample['completion']!r} (VADER {sample['reward']:+.3f})")
    print(f"\nDPO model: {result.final_dir}  |  results: {output / 'results.json'}  |  {results['seconds']:.0f} s")
    return results


def main(argv: list[str]) -> int:
    import tyro

    options = tyro.cli(DemoOptions, args=argv, prog="alignkit demo")
    run_demo(options)
    return 0
