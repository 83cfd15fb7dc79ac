"""`alignkit modes`: the share of a policy's outputs in each mode class, checkpoint by checkpoint
(Echo Chamber, Zhao et al. 2025; the maths and the class files are in `alignkit.eval.modes`).

1. the policies: with `--run DIR`, the run's initial model (step 0, its config.yaml's `model`),
   every intact `checkpoints/step-N` and `final/` (its last logged step; skipped when a
   checkpoint already has that step); and/or the `--checkpoints` given;
2. for each: `--n` samples per prompt at `--temperature` (the same seeds for every policy, so
   differences are the policy's), each labelled by `--classes`;
3. per policy, the share of each class; modes.json, modes.png (stacked shares against the step)
   and a printed table. The dominant class at the end and its share at the start and the end
   are the paper's "amplification".
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignkit.eval.modes import (
    OTHER,
    Classifier,
    checked_labels,
    dominant_mode,
    mode_shares,
    plot_mode_shares,
    read_class_table,
    regex_classifier,
    write_modes_json,
)
from alignkit.eval.stats import format_table
from alignkit.lab.generation_eval import encode_prompts, progress_bar, prompt_text, sample
from alignkit.lab.measure_common import check_counts, check_output_dir, check_policy_source
from alignkit.lab.overopt_lab import load_prompt_list
from alignkit.lab.policy_loading import checkpoint_step, load_policy, run_checkpoints

log = logging.getLogger("alignkit")
DESCRIPTION = ("Mode share over training (Echo Chamber): sample each checkpoint of a run, label every output "
               "with regex classes or a classifier, and plot each class's share against the step. Writes "
               "modes.json and modes.png to --output.")
EXAMPLES_PER_CLASS = 2


@dataclass
class ModesOptions:
    """`alignkit modes` options."""

    classes: str
    """Mode classes: a .yaml/.json file of `name: regex` (first match wins, `other` when none)
    or a classifier `file.py:fn` / `module:fn` returning one label per completion."""
    run: str | None = None
    """A training run directory: its initial model, every checkpoint and final/."""
    checkpoints: list[str] = field(default_factory=list)
    """More policies (RUN/checkpoints/step-N, RUN/final, model directories, hub ids)."""
    prompts: str = "builtin"
    """Prompt-only dataset (a `prompt` column) or `builtin` (the demo's held-out prompts)."""
    num_prompts: int | None = None
    """Use only the first N prompts."""
    n: int = 4
    """Samples per prompt and policy."""
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 32
    """Rows generated together."""
    seed: int = 0
    """Sampling seed (the same for every policy)."""
    output: str = "runs/alignkit-modes"
    """Directory for modes.json and modes.png."""
    no_progress: bool = False


def load_mode_classes(spec: str) -> tuple[list[str], Classifier]:
    """(class names in report order, classifier) for `--classes SPEC` (see eval/modes.py)."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ValueError(f"--classes {spec}: no such file")
        pairs = read_class_table(path)
        return [name for name, _ in pairs] + [OTHER], regex_classifier(pairs)
    if ":" not in spec:
        raise ValueError(f"--classes {spec}: give a .yaml/.json class file or a classifier file.py:fn / module:fn")
    from alignkit.rewards.loading import load_object

    classify = load_object(spec, what="--classes")
    if not callable(classify):
        raise ValueError(f"--classes {spec}: {type(classify).__name__} is not callable")
    return [str(n) for n in getattr(classify, "classes", [])], classify


def run_policies(run: str | None, extra: list[str]) -> list[tuple[str, int | None]]:
    """(policy, step) in step order (module docstring, step 1); explicit ones after the run's."""
    policies: list[tuple[str, int | None]] = []
    if run is not None:
        run_dir = Path(run)
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise ValueError(f"--run {run}: not a training run (no config.yaml)")
        import yaml

        initial = (yaml.safe_load(config.read_text()) or {}).get("model")
        if not isinstance(initial, str):
            raise ValueError(f"--run {run}: its config.yaml names no model path to start from")
        policies.append((initial, 0))
        steps = set()
        for path in run_checkpoints(run_dir):
            step = checkpoint_step(path)
            policies.append((str(path), step))
            steps.add(step)
        final = run_dir / "final"
        if final.is_dir() and checkpoint_step(final) not in steps:
            policies.append((str(final), checkpoint_step(final)))
        if len(policies) == 1:
            raise ValueError(f"--run {run}: no checkpoint and no final/ to compare with the initial model")
    policies += [(path, checkpoint_step(path)) for path in extra]
    return policies


def validate_modes_options(options: ModesOptions) -> None:
    if options.run is None and not options.checkpoints:
        raise ValueError("give --run DIR and/or --checkpoints PATH ...")
    check_counts(options, ("num_prompts", "n", "max_new_tokens", "batch_size"))
    if options.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {options.temperature}")
    for path in options.checkpoints:
        check_policy_source(path, "--checkpoints")
    check_output_dir(options.output)


def measure_policy(name: str, step: int | None, prompts: list[Any], classify: Classifier,
                   options: ModesOptions, progress: bool) -> dict[str, Any]:
    """Sample one policy and label its outputs: {name, step, labels, examples}."""
    model, tokenizer = load_policy(name)
    model.eval()
    with progress_bar(progress, f"sampling {Path(name).name}", len(prompts), "prompt") as bar:
        drawn = sample(model, tokenizer, encode_prompts(tokenizer, prompts), options.n,
                       max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                       seed=options.seed, max_batch_size=options.batch_size, progress=bar)
    del model
    gc.collect()
    texts = [text for group in drawn.texts for text in group]
    prompt_texts = [prompt_text(p) for p in prompts for _ in range(options.n)]
    labels = checked_labels(classify(prompt_texts, texts), len(texts), options.classes)
    examples: dict[str, list[str]] = {}
    for label, text in zip(labels, texts, strict=True):
        if len(examples.setdefault(label, [])) < EXAMPLES_PER_CLASS:
            examples[label].append(text)
    return {"name": name, "step": step, "labels": labels, "examples": examples}


def run_modes(options: ModesOptions) -> dict[str, Any]:
    """Measure every policy (module docstring) and write the report; returns modes.json's content."""
    started = time.perf_counter()
    validate_modes_options(options)
    names, classify = load_mode_classes(options.classes)
    policies = run_policies(options.run, options.checkpoints)
    prompts = load_prompt_list(options.prompts, options.num_prompts)
    progress = not options.no_progress and sys.stderr.isatty()
    measured = [measure_policy(name, step, prompts, classify, options, progress) for name, step in policies]
    seen = [label for m in measured for label in m["labels"]]
    names = list(names) + [label for label in dict.fromkeys(seen) if label not in names]
    points = []
    for index, m in enumerate(measured):
        step = m["step"] if m["step"] is not None else index  # a model of no run: its position
        points.append({"name": m["name"], "step": step, "samples": len(m["labels"]),
                       "shares": mode_shares(m["labels"], names),
                       "counts": {c: m["labels"].count(c) for c in names}, "examples": m["examples"]})
    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"classes": names, "points": points, "dominant": dominant_mode(points),
              "options": asdict(options), "seconds": round(time.perf_counter() - started, 2)}
    write_modes_json(result, out / "modes.json")
    plot_mode_shares(points, names, out / "modes.png",
                     title=f"Mode share, {len(prompts)} prompts x {options.n} samples")
    rows = [{"step": p["step"], "policy": Path(p["name"]).name, **p["shares"]} for p in points]
    print(format_table(rows, ["step", "policy", *names], float_format=".3f"))
    d = result["dominant"]
    print(f"dominant at the end: {d['class']} ({d['first_share']:.3f} -> {d['last_share']:.3f}); "
          f"wrote {out / 'modes.json'} and {out / 'modes.png'}")
    return result


def main(argv: list[str]) -> int:
    import tyro

    run_modes(tyro.cli(ModesOptions, args=argv, prog="alignkit modes", description=DESCRIPTION))
    return 0
