"""The `alignkit` command: one verb per job.

  alignkit train ALGO --model M --data D --output DIR [--set key=value ...]
  alignkit train --config recipe.yaml [--set key=value ...]
  alignkit algorithms
  alignkit demo [--output DIR]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

VERBS = {
    "train": "train a registered algorithm (alignkit train ALGO --help)",
    "algorithms": "list every algorithm with its kind, data format, models and paper",
    "demo": "align SmolLM2-135M-Instruct towards positive movie reviews and report",
}


def _pop_option(argv: list[str], name: str, repeat: bool = False) -> list[str]:
    """Remove `--name value` / `--name=value` occurrences from argv; return the values."""
    values, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv):
                raise SystemExit(f"alignkit: {name} needs a value")
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    argv[:] = rest
    if not repeat and len(values) > 1:
        raise SystemExit(f"alignkit: {name} given more than once")
    return values


def cmd_train(argv: list[str]) -> int:
    import tyro

    from alignkit.algorithms import ALGORITHMS
    from alignkit.training.config import TrainConfig, parse_set_values

    argv = list(argv)
    sets = _pop_option(argv, "--set", repeat=True)
    recipe = _pop_option(argv, "--config")
    algorithm = argv.pop(0) if argv and not argv[0].startswith("-") else None
    resume = _pop_option(argv, "--resume")
    saved = Path(resume[0]) / "config.yaml" if resume else None
    if recipe:
        default = TrainConfig.from_yaml(recipe[0])
    elif saved is not None and saved.exists():
        default = TrainConfig.from_yaml(saved)  # continue with the interrupted run's config
    else:
        default = TrainConfig()
    if resume:
        default.resume = resume[0]
    if algorithm:
        default.algorithm = algorithm
    elif not (recipe or resume or "--help" in argv or "-h" in argv):
        raise SystemExit("alignkit train: name an algorithm (alignkit algorithms lists them) or pass --config")
    description = (
        f"Train {default.algorithm}. Algorithm hyper-parameters: --set key=value "
        "(e.g. --set beta=0.1), repeatable; --config recipe.yaml loads a recipe first."
    )
    config = tyro.cli(TrainConfig, args=argv, default=default, prog="alignkit train", description=description)
    config.hparams = dict(default.hparams)
    config.apply_overrides(parse_set_values(sets))
    if config.algorithm not in ALGORITHMS:
        raise SystemExit(f"alignkit train: unknown algorithm {config.algorithm!r}; see `alignkit algorithms`")
    if config.data is None and not config.resume:
        raise SystemExit("alignkit train: --data is required")

    from alignkit.training.offline import run_offline

    result = run_offline(config)
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
    print(f"final model: {result.final_dir}")
    print(f"last metrics: {shown}")
    return 0


def cmd_algorithms(argv: list[str]) -> int:
    from alignkit.algorithms import algorithms_table

    print(algorithms_table(markdown="--markdown" in argv))
    return 0


def cmd_demo(argv: list[str]) -> int:
    from alignkit.demo import main as demo_main

    return demo_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nverbs:")
        for verb, text in VERBS.items():
            print(f"  {verb:<11} {text}")
        return 0
    verb, rest = argv[0], argv[1:]
    commands = {"train": cmd_train, "algorithms": cmd_algorithms, "demo": cmd_demo}
    if verb not in commands:
        print(f"alignkit: unknown verb {verb!r}; one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    return commands[verb](rest)


if __name__ == "__main__":
    raise SystemExit(main())
