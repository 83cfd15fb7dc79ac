"""A self-contained HTML report comparing methods (e.g. the demo's base / grpo / dpo).

`write_report(results, out_dir)` writes into `out_dir`:
  report.html            one file, PNGs embedded as base64: a table of methods (gold reward
                         with its 95% interval, KL, length, diversity, win rate), the plots,
                         and samples of every method side by side, prompt by prompt;
  reward_bars.png        gold reward per method with 95% CI error bars;
  reward_vs_kl.png       reward against KL over training, for methods that carry a `curve`;
  validation.png         eval/* against the step (train reward/mean beside eval/reward and
                         eval/gold), for methods that carry a `validation` (an online run's
                         --eval-data rows, `validation_from_metrics`);
  results.json           `results` as given (NaN/inf written as null).

The input schema is `ReportInput` below. A method's entry may be exactly what
`alignkit.lab.evaluate_model` returns (its flat keys are the `MethodResult` keys) or the
demo's smaller dict; only `gold_reward` is required.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, TypedDict

from alignkit.eval.plots import plot_reward_bars, plot_reward_vs_kl, plot_validation


class Sample(TypedDict, total=False):
    prompt: str
    completion: str
    reward: float


class CurvePoint(TypedDict, total=False):
    step: int
    kl: float | None  # KL(policy || reference) at that step; None when not logged (DPO)
    reward: float  # the reward logged at that step (online: reward/mean)
    metric: str  # which logged metric `reward` is, shown in the plot legend


class MethodResult(TypedDict, total=False):
    gold_reward: float  # required: mean gold reward over all samples
    ci_low: float  # 95% bootstrap interval of gold_reward
    ci_high: float
    kl: float | None  # sampled KL(policy || reference), k1 per response
    mean_length_words: float
    mean_length_tokens: float
    win_rate: float | None  # against the reference, both orders, ties half
    lc_win_rate: float | None  # length-controlled win rate
    diversity: dict[str, dict[str, float]]  # {"per_input": {...}, "across_input": {...}}
    samples: list[Sample]  # shown side by side across methods, matched by prompt
    curve: list[CurvePoint]  # training trajectory for reward_vs_kl.png
    validation: list[dict[str, float]]  # metrics.jsonl rows with eval/* (and reward/mean) for validation.png


class ReportInput(TypedDict, total=False):
    title: str
    task: str  # one line saying what the gold reward measures
    methods: dict[str, MethodResult]  # required; insertion order = column order
    notes: list[str]  # free-text lines shown under the table


def curve_from_metrics(
    metrics_jsonl: str | Path, *, kl_key: str = "kl", reward_key: str = "reward/mean"
) -> list[CurvePoint]:
    """(step, kl, reward) points from a run's metrics.jsonl. Online runs log `kl` and
    `reward/mean`; for offline DPO pass e.g. reward_key="rewards/margins" (kl is then None)."""
    points: list[CurvePoint] = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if reward_key in row:
            points.append(
                CurvePoint(
                    step=row.get("step"), kl=row.get(kl_key), reward=row[reward_key], metric=reward_key
                )
            )
    return points


def validation_from_metrics(metrics_jsonl: str | Path) -> list[dict[str, float]]:
    """The points of an online run's metrics.jsonl that validation.png draws (`validation_points`)."""
    lines = Path(metrics_jsonl).read_text().splitlines()
    return validation_points([json.loads(line) for line in lines if line.strip()])


def validation_points(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """`step` with the eval/* metrics (--eval-data) and the training batches' `reward/mean`, where
    logged; the first row's eval_start/* (the validation before step 1) as a point at step 0."""
    points = []
    for row in rows:
        start = {"eval/" + k[len("eval_start/"):]: v for k, v in row.items()
                 if k.startswith("eval_start/") and isinstance(v, int | float)}
        if start:
            points.append({"step": 0, **start})
        kept = {k: v for k, v in row.items() if (k.startswith("eval/") or k == "reward/mean")
                and isinstance(v, int | float)}
        if kept:
            points.append({"step": row.get("step", 0), **kept})
    return points


def json_safe(value: Any) -> Any:
    """A copy of `value` that `json.dumps` writes as strict JSON (non-finite floats -> None)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return json_safe(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    return format(float(value), spec)


def _diversity(method: MethodResult, block: str, key: str) -> Any:
    diversity = method.get("diversity") or {}
    return (diversity.get(block) or {}).get(key) if isinstance(diversity, dict) else None


def method_rows(methods: dict[str, MethodResult]) -> list[dict[str, str]]:
    """One display row per method (strings, HTML-escaped), the columns of the report table."""
    rows = []
    for name, m in methods.items():
        reward = f"{_fmt(m['gold_reward'], '+.3f')}"
        if m.get("ci_low") is not None:
            reward += f" [{_fmt(m['ci_low'], '+.3f')}, {_fmt(m.get('ci_high'), '+.3f')}]"
        win = _fmt(m.get("win_rate"))
        if m.get("lc_win_rate") is not None:
            win += f" (LC {_fmt(m.get('lc_win_rate'))})"
        rows.append(
            {
                "method": html.escape(name),
                "gold reward [95% CI]": reward,
                "KL to reference": _fmt(m.get("kl")),
                "length (words)": _fmt(m.get("mean_length_words"), ".1f"),
                "EAD per-input / across": f"{_fmt(_diversity(m, 'per_input', 'ead'))} / "
                f"{_fmt(_diversity(m, 'across_input', 'ead'))}",
                "embedding div. per-input / across": f"{_fmt(_diversity(m, 'per_input', 'embedding'))} / "
                f"{_fmt(_diversity(m, 'across_input', 'embedding'))}",
                "win rate vs reference": win,
            }
        )
    return rows


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>no methods</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{v}</td>" for v in row.values()) + "</tr>" for row in rows
    )
    return f'<table class="methods"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _samples_table(methods: dict[str, MethodResult], limit: int) -> str:
    """Rows = prompts (from the first method that has samples), columns = methods."""
    order = [p for m in methods.values() for p in (s.get("prompt") for s in m.get("samples", []))]
    prompts = list(dict.fromkeys(p for p in order if p is not None))[:limit]
    if not prompts:
        return "<p>no samples given</p>"
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in methods)
    body = []
    for prompt in prompts:
        cells = [f"<td class='prompt'>{html.escape(prompt)}</td>"]
        for m in methods.values():
            found = next((s for s in m.get("samples", []) if s.get("prompt") == prompt), None)
            if found is None:
                cells.append("<td>&ndash;</td>")
            else:
                score = f"<div class='score'>reward {_fmt(found.get('reward'), '+.3f')}</div>"
                cells.append(f"<td>{html.escape(str(found.get('completion', '')))}{score}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:6px 9px;
vertical-align:top;text-align:left}th{background:#f2f2f2}table.methods td{text-align:right}
table.methods td:first-child{text-align:left;font-weight:600}table.samples td{width:30%;
font-size:0.92em}td.prompt{font-style:italic;width:18%}.score{color:#666;font-size:0.85em;
margin-top:4px}img{max-width:100%;border:1px solid #eee}.notes{color:#444}
"""


_VALIDATION_NOTE = """<p class="notes">Validation: held-out prompts sampled during training with the
training sampling settings (step 0: before the first update). eval/reward: the trained reward;
eval/gold: the gold reward, whose fall while the trained reward rises is over-optimisation;
eval/pass@k: unbiased estimator of Chen et al. 2021 over prompts; eval/kl: k1 per response.</p>"""


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def write_report(
    results: ReportInput | dict[str, Any], out_dir: str | Path, *, samples: int = 4
) -> dict[str, Any]:
    """Write report.html, reward_bars.png, reward_vs_kl.png (when any method has a `curve`),
    validation.png (when any has eval/* in its `validation`) and results.json into `out_dir`;
    returns their paths. `samples`: prompts shown in the
    side-by-side sample table."""
    methods: dict[str, MethodResult] = dict(results.get("methods") or {})
    if not methods:
        raise ValueError("results['methods'] must name at least one method")
    missing = [name for name, m in methods.items() if m.get("gold_reward") is None]
    if missing:
        raise ValueError(f"methods without a gold_reward: {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = results.get("title") or "alignkit evaluation report"
    figures = [plot_reward_bars(methods, out / "reward_bars.png")]
    curves = {name: m["curve"] for name, m in methods.items() if m.get("curve")}
    if curves:
        figures.append(plot_reward_vs_kl(curves, out / "reward_vs_kl.png"))
    validation = {name: m["validation"] for name, m in methods.items()
                  if any(k.startswith("eval/") for p in m.get("validation") or [] for k in p)}
    if validation:
        figures.append(plot_validation(validation, out / "validation.png"))
    (out / "results.json").write_text(json.dumps(json_safe(dict(results)), indent=2))

    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in results.get("notes") or [])
    task = html.escape(str(results.get("task", "")))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{task}</p>
<h2>Methods</h2>
{_table(method_rows(methods))}
<p class="notes">Gold reward: mean over all samples; interval: 95% percentile bootstrap.
KL: sampled KL(policy || reference) per response (k1 estimator). Win rate: judged in both
orders, ties half; LC = length-controlled. Diversity: Kirk et al. 2023 (EAD averaged over
n = 1..5; embedding = 1 - mean pairwise cosine of all-MiniLM-L6-v2 embeddings).</p>
<ul class="notes">{notes}</ul>
{_VALIDATION_NOTE if validation else ""}
<h2>Plots</h2>
{"".join(_image(path, path.stem) for path in figures)}
<h2>Samples side by side</h2>
{_samples_table(methods, samples)}
</body></html>
"""
    (out / "report.html").write_text(page)
    return {"html": out / "report.html", "results": out / "results.json", "plots": figures}
