"""The report of `alignkit sweep`: report.json, report.html and trials.png in the sweep's DIR.

The chosen configuration's test-seed score (mean over test seeds, 95% percentile bootstrap
over seeds) sits next to its tuning score: the gap between them is how much the search
flattered its winner ("optimism", positive when the tuning score was the better one).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from alignkit.eval.report import json_safe
from alignkit.eval.stats import bootstrap_ci


def seed_interval(scores: list[float], n_resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) of per-seed scores; NaN throughout when any score is not finite.

    >>> seed_interval([1.0, 1.0], 100, 0)
    (1.0, 1.0, 1.0)
    """
    if not scores or not all(math.isfinite(s) for s in scores):
        return (math.nan, math.nan, math.nan)
    mean, low, high = bootstrap_ci(scores, n_resamples=n_resamples, seed=seed)
    return (float(mean), float(low), float(high))


def optimism(tuning: float, test: float, direction: str) -> float:
    """How much better the tuning score looks than the test score (> 0: over-tuned).

    >>> optimism(3.0, 2.0, "maximize"), optimism(1.0, 1.5, "minimize")
    (1.0, 0.5)
    """
    return tuning - test if direction == "maximize" else test - tuning


def build_report(settings, records, best, test_scores: dict[int, float], test_runs: dict[int, str]) -> dict:
    """The report as plain data: settings, every trial, and the chosen configuration's scores."""
    tune = [best.scores[s] for s in settings.tune_seeds]
    test = [test_scores[s] for s in settings.test_seeds]
    tuning_mean, tuning_low, tuning_high = seed_interval(tune, settings.n_bootstrap, settings.study_seed)
    test_mean, test_low, test_high = seed_interval(test, settings.n_bootstrap, settings.study_seed)
    return {
        "recipe": settings.recipe,
        "algorithm": settings.config.algorithm,
        "space": settings.fingerprint()["space"],
        "metric": settings.metric,
        "direction": settings.direction,
        "last_k": settings.last_k,
        "study_seed": settings.study_seed,
        "tune_seeds": list(settings.tune_seeds),
        "test_seeds": list(settings.test_seeds),
        "trials": [
            {"index": r.index, "values": r.values, "score": r.score,
             "scores": {str(s): v for s, v in r.scores.items()}, "runs": {str(s): v for s, v in r.runs.items()}}
            for r in records
        ],
        "best": {
            "index": best.index,
            "values": best.values,
            "tuning_score": tuning_mean,
            "tuning_ci": [tuning_low, tuning_high],
            "tuning_scores": {str(s): best.scores[s] for s in settings.tune_seeds},
            "test_score": test_mean,
            "test_ci": [test_low, test_high],
            "test_scores": {str(s): v for s, v in test_scores.items()},
            "test_runs": {str(s): v for s, v in test_runs.items()},
            "optimism": optimism(tuning_mean, test_mean, settings.direction),
        },
    }


def plot_trials(report: dict, path: Path) -> Path:
    """Each tuning seed's score and the trial mean per trial, the running best, and the chosen
    configuration's test-seed scores to the right of the last trial."""
    from alignkit.eval.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    trials, best_index = report["trials"], report["best"]["index"]
    for t in trials:
        seeds = [v for v in t["scores"].values() if v is not None and math.isfinite(v)]
        ax.scatter([t["index"]] * len(seeds), seeds, color="#9ecae1", s=14,
                   label="tuning seed" if t is trials[0] else None)
    means = [t["score"] for t in trials]
    ax.plot([t["index"] for t in trials], means, "o-", color="#1f77b4", label="trial mean (tuning seeds)")
    running, best = [], None
    for value in means:
        if value is not None and math.isfinite(value):
            better = best is None or (value > best if report["direction"] == "maximize" else value < best)
            best = value if better else best
        running.append(best if best is not None else math.nan)
    ax.step([t["index"] for t in trials], running, where="post", color="#2ca02c", label="best so far")
    x_test = len(trials)
    tests = [v for v in report["best"]["test_scores"].values() if v is not None and math.isfinite(v)]
    ax.scatter([x_test] * len(tests), tests, marker="x", color="#d62728", s=30,
               label=f"trial {best_index} on test seeds")
    ax.axvline(x_test - 0.5, color="grey", lw=0.8, ls=":")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial (last column: chosen configuration, test seeds)")
    ax.set_ylabel(f"{report['metric']} ({report['direction']})")
    ax.set_title(f"Sweep of {report['algorithm']}: {report['metric']} per trial")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "&ndash;" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict, plot: Path) -> str:
    """report.html: the chosen configuration (tuning vs test score), every trial, the plot."""
    from alignkit.eval.report import _CSS, _image

    best, keys = report["best"], list(report["space"])
    summary = _table(
        ["", report["metric"], "95% interval (bootstrap over seeds)", "seeds"],
        [["tuning seeds", best["tuning_score"], "[{}, {}]".format(*map(_cell, best["tuning_ci"])),
          ", ".join(map(str, report["tune_seeds"]))],
         ["test seeds", best["test_score"], "[{}, {}]".format(*map(_cell, best["test_ci"])),
          ", ".join(map(str, report["test_seeds"]))]],
    )
    trials = _table(
        ["trial", *keys, "score", *[f"seed {s}" for s in report["tune_seeds"]]],
        [[t["index"], *[t["values"].get(k) for k in keys], t["score"] if t["score"] is not None else math.nan,
          *[t["scores"].get(str(s)) if t["scores"].get(str(s)) is not None else math.nan
            for s in report["tune_seeds"]]] for t in report["trials"]],
    )
    values = ", ".join(f"{k}={v!r}" for k, v in best["values"].items())
    title = f"alignkit sweep: {report['algorithm']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Recipe {html.escape(str(report['recipe']))}; {len(report['trials'])} trials; metric
{html.escape(report['metric'])} ({report['direction']}), mean of its last {report['last_k']} logged
value(s) per run; Optuna TPE, study seed {report['study_seed']}.</p>
<h2>Chosen configuration: trial {best['index']}</h2>
<p><code>{html.escape(values)}</code></p>
{summary}
<p class="notes">Optimism (tuning score better than test score by): {_cell(best['optimism'])}.
The tuning score is the maximum over the searched trials, so it is biased upwards; the test
seeds were never seen by the search (Eimer et al. 2023). With few seeds the bootstrap interval
is coarse.</p>
<h2>Trials</h2>
{trials}
<h2>Plot</h2>
{_image(plot, "trial scores")}
</body></html>
"""


def write_sweep_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, trials.png and report.html into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    plot = plot_trials(report, out / "trials.png")
    (out / "report.html").write_text(render_html(report, plot))
    return {"json": out / "report.json", "html": out / "report.html", "plot": plot}
