"""Reproduce the alignment-tax trade-off of model averaging (Lin et al. 2024, "Mitigating the
Alignment Tax of RLHF") on the demo's models, on CPU.

1. the demo's GRPO model: SmolLM2-135M-Instruct + LoRA trained online on VADER sentiment with
   exactly `alignkit demo`'s GRPO settings (`alignkit.demo.train_grpo`), or an existing run's
   final/ (--grpo DIR);
2. interpolate base and GRPO weights, theta(alpha) = alpha theta_base + (1 - alpha) theta_grpo
   (ALGORITHMS.md 4.1; alpha weights the pre-RLHF model), for alpha in {1, 0.75, 0.5, 0.25, 0},
   saved as safetensors checkpoints under OUT/sweep/alpha-A (a local helper: alignkit merge is
   not on main yet);
3. `alignkit tax` over the sweep (alpha = 1, the base, first): held-out NLL on the shipped
   general text against the VADER reward of greedy generations on the held-out movie prompts;
   the Pareto front of (NLL increase, reward).

    python bench/alignment_tax.py                          # ~10 min on 2 CPU cores
    python bench/alignment_tax.py --grpo alignkit-demo/grpo/final --output /tmp/tax-sweep

Prints the table and writes OUT/tax/report.html (tax_pareto.png) and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)


def interpolate_checkpoints(base_dir: Path, tuned_dir: Path, alpha: float, out_dir: Path) -> Path:
    """Save theta = alpha * theta_base + (1 - alpha) * theta_tuned (every tensor of the two
    safetensors state dicts, which must hold the same names and shapes) with the tuned model's
    config and tokenizer. alpha = 1 is the base bit for bit, alpha = 0 the tuned model."""
    import torch
    from safetensors.torch import load_file, save_file

    def state(directory: Path) -> dict[str, torch.Tensor]:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors weights")
        merged: dict[str, torch.Tensor] = {}
        for file in files:
            merged.update(load_file(str(file)))
        return merged

    base, tuned = state(base_dir), state(tuned_dir)
    if set(base) != set(tuned):
        raise ValueError(f"{base_dir} and {tuned_dir} hold different tensors: "
                         f"{sorted(set(base) ^ set(tuned))[:4]}")
    mixed = {}
    for name, base_value in base.items():
        if base_value.shape != tuned[name].shape:
            raise ValueError(f"{name}: shapes {tuple(base_value.shape)} and {tuple(tuned[name].shape)} differ")
        mixed[name] = (alpha * base_value.double() + (1.0 - alpha) * tuned[name].double()).to(base_value.dtype)
        mixed[name] = mixed[name].contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(mixed, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for file in tuned_dir.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and not file.name.endswith(".index.json"):
            shutil.copy2(file, out_dir / file.name)
    return out_dir


def train_demo_grpo(output: Path) -> Path:
    """The demo's GRPO run (same options, prompts and reward as `alignkit demo`); its final/."""
    from alignkit.demo import DemoOptions, load_prompts, train_grpo
    from alignkit.rewards import VaderSentiment
    from alignkit.training.run.threads import configure_threads

    options = DemoOptions(output=str(output))
    configure_threads(options)
    train_prompts = load_prompts()["train"][: options.train_prompts]
    result = train_grpo(options, train_prompts, VaderSentiment(), output)
    return Path(result.final_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpo", default=None, help="an existing GRPO run's final/ (default: train the demo's)")
    parser.add_argument("--output", default="runs/bench-alignment-tax", help="work and report directory")
    parser.add_argument("--num-passages", type=int, default=None, help="first N shipped passages (default all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from alignkit.lab.tax_lab import TaxOptions, run_tax
    from alignkit.models import resolve_model_path

    started = time.perf_counter()
    output = Path(args.output)
    grpo = Path(args.grpo) if args.grpo else train_demo_grpo(output)
    trained = time.perf_counter()
    base = Path(resolve_model_path("smollm2-135m"))
    sweep = [interpolate_checkpoints(base, grpo, alpha, output / "sweep" / f"alpha-{alpha:.2f}") for alpha in ALPHAS]
    options = TaxOptions(models=",".join(str(p) for p in sweep), reward="vader", output=str(output / "tax"),
                         num_passages=args.num_passages)
    results = run_tax(options)
    rows = [{"alpha": alpha, "nll": r["nll"], "nll_increase": r["nll_increase"],
             "nll_increase_ci": [r["nll_increase_ci_low"], r["nll_increase_ci_high"]], "reward": r["reward"],
             "reward_ci": [r["reward_ci_low"], r["reward_ci_high"]], "pareto": r["pareto"]}
            for alpha, r in zip(ALPHAS, results["models"], strict=True)]
    summary = {"grpo": str(grpo), "rows": rows, "train_seconds": trained - started,
               "total_seconds": time.perf_counter() - started}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nalpha  NLL increase [95% CI]        VADER reward [95% CI]     front")
    for row in rows:
        print(f"{row['alpha']:.2f}   {row['nll_increase']:+.4f} [{row['nll_increase_ci'][0]:+.4f}, "
              f"{row['nll_increase_ci'][1]:+.4f}]   {row['reward']:+.3f} [{row['reward_ci'][0]:+.3f}, "
              f"{row['reward_ci'][1]:+.3f}]   {'yes' if row['pareto'] else 'dominated'}")
    print(f"\nsummary: {output / 'summary.json'}  |  {summary['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
