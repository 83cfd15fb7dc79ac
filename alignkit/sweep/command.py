"""`alignkit sweep --config recipe.yaml --space space.yaml --trials N ...`: the verb's flags."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from alignkit.lab.argtypes import non_negative_int, positive_int

DESCRIPTION = """Hyper-parameter search with Optuna (TPE, seeded) over a training recipe. Each trial
trains the recipe with values sampled from --space on every --tune-seeds seed (runs kept in
DIR/trials/NNN-seedS/) and scores the mean over seeds of --metric (per run: the mean of its
last --last-k logged values). The best trial is trained again on --test-seeds, which must be
disjoint from the tuning seeds, and DIR/report.html (+ report.json, trials.png) shows its
test-seed score with a bootstrap interval next to its tuning score. The study lives in
DIR/study.db: --resume DIR continues an interrupted sweep, sampling what it would have."""

SPACE_HELP = """YAML mapping of keys (TrainConfig fields like lr, or --set hyper-parameters like
beta) to distributions: {type: float, low, high[, log: true][, step]}, {type: int, low, high[,
log][, step]}, {type: categorical, choices: [...]}."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit sweep", description=DESCRIPTION)
    parser.add_argument("--config", required=True, help="training recipe YAML (as alignkit train --config)")
    parser.add_argument("--space", required=True, help=SPACE_HELP)
    parser.add_argument("--trials", required=True, type=positive_int, help="number of trials (in all, "
                        "counting those of a resumed sweep)")
    parser.add_argument("--tune-seeds", default="0,1", help="comma-separated seeds every trial trains on")
    parser.add_argument("--test-seeds", default="100,101,102", help="comma-separated seeds the chosen "
                        "configuration is tested on; disjoint from --tune-seeds")
    parser.add_argument("--metric", default="loss", help="logged metric to score (loss, eval/loss, "
                        "reward/mean, eval/gold, ...)")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default=None,
                        help="default: minimize for losses and kl, maximize for rewards and accuracies")
    parser.add_argument("--last-k", type=positive_int, default=1, help="score a run by the mean of the "
                        "metric's last K logged values (1: its last value)")
    parser.add_argument("--study-seed", type=non_negative_int, default=0, help="seed of the TPE sampler")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key for every trial (repeatable)")
    parser.add_argument("--output", default="runs/sweep", help="sweep directory")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --output")
    parser.add_argument("--n-bootstrap", type=positive_int, default=2000, help="bootstrap resamples")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def settings_from_args(args: argparse.Namespace):
    """SweepSettings from parsed flags; every check here runs before anything trains."""
    from alignkit.sweep.runner import SweepSettings
    from alignkit.sweep.space import (
        check_disjoint_seeds,
        default_direction,
        load_space,
        parse_seeds,
    )
    from alignkit.training.run.config import TrainConfig, parse_set_values

    tune_seeds = parse_seeds(args.tune_seeds, "--tune-seeds")
    test_seeds = parse_seeds(args.test_seeds, "--test-seeds")
    check_disjoint_seeds(tune_seeds, test_seeds)
    direction = args.direction or default_direction(args.metric)
    config = TrainConfig.from_yaml(args.config)
    for key, value in parse_set_values(args.set).items():
        try:
            config.apply_overrides({key: value})
        except ValueError as error:
            raise ValueError(f"--set {key}: {error}") from None
    if config.data is None:
        raise ValueError(f"{args.config}: the recipe names no data (add `data: FILE` or --set data=FILE)")
    return SweepSettings(
        config=config, space=load_space(args.space), trials=args.trials, tune_seeds=tune_seeds,
        test_seeds=test_seeds, metric=args.metric, direction=direction, last_k=args.last_k,
        study_seed=args.study_seed, output=Path(args.output), recipe=str(args.config),
        space_file=str(args.space), progress=args.progress, n_bootstrap=args.n_bootstrap,
    )


def _fmt(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4g}"


def main(argv: list[str]) -> int:
    """Parse, run the sweep, print the chosen configuration and where the report is."""
    from alignkit.sweep.runner import run_sweep

    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    report = run_sweep(settings, resume=args.resume)
    best = report["best"]
    print(f"best trial {best['index']}: {best['values']}")
    print(f"{settings.metric}: tuning seeds {_fmt(best['tuning_score'])} "
          f"[{_fmt(best['tuning_ci'][0])}, {_fmt(best['tuning_ci'][1])}]; test seeds {_fmt(best['test_score'])} "
          f"[{_fmt(best['test_ci'][0])}, {_fmt(best['test_ci'][1])}]")
    print(f"report: {settings.output / 'report.html'}")
    return 0
