"""`alignkit sweep`: hyper-parameter search with Optuna over a training recipe, tuned on some
seeds and tested on others (Eimer et al. 2023, "Hyperparameters in Reinforcement Learning and
How To Tune Them": separate tuning and test seeds, or the tuning score flatters the choice).

1. Check everything that needs no training: the space's every bound or choice is a valid value
   of its key for this recipe, the seeds are disjoint, DIR is new (or --resume matches it).
2. For trial i = 0..N-1: a TPESampler seeded with `study_seed + i` samples the space given the
   trials finished so far (Optuna's sqlite storage DIR/study.db), the recipe trains once per
   tuning seed in DIR/trials/iii-seedS/, and the trial's score is the mean of their scores.
3. The best trial's values train again on each test seed (DIR/test/seedS/); the report gives
   their score with a bootstrap interval next to the tuning score.

Seeding the sampler per trial index (rather than once per process) makes an interrupted sweep,
resumed, sample exactly what the uninterrupted one would have: trial i depends only on the
study seed, i, and the trials before it. A trial cut short is marked failed in the study and
run again; its score never enters the sampler's history.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.sweep.scoring import is_better, mean_score, metric_score, read_metrics
from alignkit.sweep.space import Distribution, check_disjoint_seeds, space_to_dict
from alignkit.training.run.config import TrainConfig, field_types

STUDY_NAME = "alignkit-sweep"


@dataclass
class SweepSettings:
    """Everything that defines a sweep; `fingerprint()` of it must match on --resume."""

    config: TrainConfig
    space: dict[str, Distribution]
    trials: int
    tune_seeds: list[int]
    test_seeds: list[int]
    metric: str = "loss"
    direction: str = "minimize"
    last_k: int = 1
    study_seed: int = 0
    output: Path = Path("runs/sweep")
    recipe: str = ""
    space_file: str = "space"
    progress: bool = True
    n_bootstrap: int = 2000

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed sweep must share with the first launch (--trials may grow)."""
        recipe = self.config.to_dict()
        recipe.pop("output", None)
        return {"recipe": recipe, "space": space_to_dict(self.space), "tune_seeds": list(self.tune_seeds),
                "test_seeds": list(self.test_seeds), "metric": self.metric, "direction": self.direction,
                "last_k": self.last_k, "study_seed": self.study_seed}


@dataclass
class TrialRecord:
    """One finished trial: its values, the score on each tuning seed, their mean, its runs."""

    index: int
    values: dict[str, Any]
    scores: dict[int, float]
    score: float
    runs: dict[int, str] = field(default_factory=dict)


def trial_config(base: TrainConfig, values: dict[str, Any], seed: int, run_dir: Path) -> TrainConfig:
    """A copy of the recipe with the sampled values, `seed` and `run_dir` as its output."""
    config = TrainConfig.from_dict(base.to_dict())
    config.apply_overrides(dict(values))
    config.seed, config.output = seed, str(run_dir)
    config.overwrite, config.progress, config.resume = True, False, None
    return config


def check_space(settings: SweepSettings) -> None:
    """Each bound (or choice) of every key, set alone on the recipe, passes the checks `train`
    runs before loading anything; then the recipe with the first values passes the full check
    (model and data exist, no key the algorithm ignores). Errors name the space file and key."""
    from alignkit.training.run.validate import validate_config, validate_values

    base, source = settings.config, settings.space_file
    check_disjoint_seeds(settings.tune_seeds, settings.test_seeds)
    for key, dist in settings.space.items():
        for value in dist.extremes():
            try:
                validate_values(trial_config(base, {key: value}, 0, settings.output))
            except ValueError as error:
                raise ValueError(f"{source}: key {key!r} = {value!r}: {error}") from None
    first = {key: dist.extremes()[0] for key, dist in settings.space.items()}
    given = {key for key in settings.space if key in field_types()}
    try:
        validate_config(trial_config(base, first, settings.tune_seeds[0], settings.output), given)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def train_run(config: TrainConfig):
    """Train one config as `alignkit train --config` does; returns its TrainResult."""
    from alignkit.training.run.registry import ALGORITHMS
    from alignkit.training.run.validate import validate_config

    validate_config(config)
    if config.placement != "local":
        from alignkit.training.cluster.launch import run_placed as run
    elif ALGORITHMS[config.algorithm].runner == "online":
        from alignkit.training.online.loop import run_online as run
    else:
        from alignkit.training.offline.loop import run_offline as run
    return run(config)


@contextlib.contextmanager
def quiet_runs():
    """Keep each run's INFO lines and transformers' loading bars off the terminal while the
    sweep's progress bar shows."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("alignkit")
    level, bars = logger.level, hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def score_run(config: TrainConfig, settings: SweepSettings) -> float:
    """Train `config` and score its metrics.jsonl (see `alignkit.sweep.scoring`)."""
    with quiet_runs():
        train_run(config)
    return metric_score(read_metrics(config.output), settings.metric, settings.last_k, config.output)


def prepare_output(settings: SweepSettings, resume: bool) -> None:
    """A new sweep needs an empty DIR; --resume needs DIR/sweep.json with the same settings."""
    out = settings.output
    saved = out / "sweep.json"
    if not resume:
        if out.exists() and any(out.iterdir()):
            hint = "pass --resume to continue the sweep there" if saved.exists() else "choose another"
            raise ValueError(f"--output {out}: not empty; {hint}")
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(settings.fingerprint(), indent=2, default=str) + "\n")
        return
    if not saved.is_file():
        raise FileNotFoundError(f"--resume: {saved} not found, so {out} holds no sweep to continue")
    before, now = json.loads(saved.read_text()), json.loads(json.dumps(settings.fingerprint(), default=str))
    changed = sorted(key for key in now if before.get(key) != now.get(key))
    if changed:
        raise ValueError(f"--resume {out}: settings differ from the interrupted sweep's ({', '.join(changed)}); "
                         "resume with the same recipe, space, seeds, metric and --study-seed")


def open_study(settings: SweepSettings, sampler=None):
    """The sweep's Optuna study in DIR/study.db (created on first use)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(settings.output / 'study.db').resolve()}"
    return optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=settings.direction,
                               sampler=sampler, load_if_exists=True)


def finished_trials(study) -> list:
    """Trials that count towards --trials, by number: complete ones and those whose metric was
    not finite (a diverged configuration is a result). Those cut short are marked failed."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.user_attrs.get("diverged"))]


def record_of(trial) -> TrialRecord:
    """A TrialRecord from a finished Optuna trial's params and user attributes."""
    attrs = trial.user_attrs
    scores = {int(seed): float(score) for seed, score in attrs["scores"].items()}
    return TrialRecord(attrs["index"], dict(trial.params), scores, mean_score(list(scores.values())),
                       {int(seed): run for seed, run in attrs["runs"].items()})


def ask_values(study, space: dict[str, Distribution]):
    """A new trial of `study` and the values its sampler draws for every key of `space`."""
    trial = study.ask({key: dist.to_optuna() for key, dist in space.items()})
    return trial, dict(trial.params)


def run_trial(study, index: int, settings: SweepSettings, bar) -> TrialRecord:
    """Ask the study for values, train them on every tuning seed, tell it their mean score."""
    from optuna.trial import TrialState

    trial, values = ask_values(study, settings.space)
    scores, runs = {}, {}
    for seed in settings.tune_seeds:
        run_dir = settings.output / "trials" / f"{index:03d}-seed{seed}"
        scores[seed] = score_run(trial_config(settings.config, values, seed, run_dir), settings)
        runs[seed] = str(run_dir.relative_to(settings.output))
        bar.update(1)
    score = mean_score(list(scores.values()))
    trial.set_user_attr("index", index)
    trial.set_user_attr("scores", {str(s): v if math.isfinite(v) else None for s, v in scores.items()})
    trial.set_user_attr("runs", {str(s): r for s, r in runs.items()})
    record = TrialRecord(index, values, scores, score, runs)
    with (settings.output / "trials.jsonl").open("a") as log:
        log.write(json.dumps({"index": index, "values": values, "score": score if math.isfinite(score) else None,
                              "scores": {str(s): v for s, v in scores.items()}, "runs": runs}, default=str) + "\n")
    if math.isfinite(score):
        study.tell(trial, score)
    else:
        trial.set_user_attr("diverged", True)
        study.tell(trial, state=TrialState.FAIL)
    return record


def best_record(records: list[TrialRecord], direction: str) -> TrialRecord:
    """The first trial with the best finite score."""
    best = None
    for record in records:
        if is_better(record.score, None if best is None else best.score, direction):
            best = record
    if best is None:
        raise ValueError(f"every trial's metric was NaN or inf ({len(records)} trials); narrow the space")
    return best


def progress_bar(settings: SweepSettings, done: int):
    """One bar over all training runs of the sweep: trials x tuning seeds, then test seeds."""
    from tqdm.auto import tqdm

    total = settings.trials * len(settings.tune_seeds) + len(settings.test_seeds)
    return tqdm(total=total, initial=done * len(settings.tune_seeds), desc="sweep", unit="run",
                disable=not settings.progress, file=sys.stderr, dynamic_ncols=True)


def run_sweep(settings: SweepSettings, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the sweep; write DIR/report.{json,html} and trials.png; return the report."""
    from optuna.samplers import TPESampler

    from alignkit.sweep.report import build_report, write_sweep_report

    check_space(settings)
    prepare_output(settings, resume)
    done = finished_trials(open_study(settings))
    if len(done) > settings.trials:
        raise ValueError(f"--trials {settings.trials}: {settings.output} already holds {len(done)} finished "
                         "trials; pass --trials >= that")
    records = [record_of(t) for t in done]
    bar = progress_bar(settings, len(records))
    try:
        for index in range(len(records), settings.trials):
            study = open_study(settings, TPESampler(seed=settings.study_seed + index))
            records.append(run_trial(study, index, settings, bar))
            best = best_record(records, settings.direction) if any(math.isfinite(r.score) for r in records) else None
            bar.set_postfix(trial=index, best=f"{best.score:.4g}" if best else "nan")
        best = best_record(records, settings.direction)
        bar.set_description("test seeds")
        test_scores, test_runs = {}, {}
        for seed in settings.test_seeds:
            run_dir = settings.output / "test" / f"seed{seed}"
            test_scores[seed] = score_run(trial_config(settings.config, best.values, seed, run_dir), settings)
            test_runs[seed] = str(run_dir.relative_to(settings.output))
            bar.update(1)
    finally:
        bar.close()
    report = build_report(settings, records, best, test_scores, test_runs)
    write_sweep_report(report, settings.output)
    return report
