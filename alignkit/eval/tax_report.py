"""The `alignkit tax` report: `write_tax_report(results, out_dir)` writes

  report.html     one file, PNGs embedded: the table of models (NLL per token with its 95%
                  interval, NLL increase over the base, reward), NLL per text category, the
                  plots, and greedy samples side by side;
  tax_nll.png     NLL per token per model (points), 95% bootstrap interval over passages;
  tax_reward.png  reward of greedy generations per model, 95% bootstrap interval over prompts;
  tax_pareto.png  with 3+ models: reward against NLL increase, the Pareto front marked;
  tax.json        `results` (NaN/inf written as null).

`results["models"]` are the rows of `alignkit.eval.tax.summarise_tax` plus `label` (a short
name for plots) and `samples` ([{"prompt", "completion", "reward"}]).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from alignkit.eval.measure_plots import plot_interval_bars, plot_pareto
from alignkit.eval.report import _CSS, _fmt, _image, json_safe


def _interval(row: dict[str, Any], key: str, spec: str = ".4f") -> str:
    return (f"{_fmt(row[key], spec)} [{_fmt(row.get(key + '_ci_low'), spec)}, "
            f"{_fmt(row.get(key + '_ci_high'), spec)}]")


def _models_table(rows: list[dict[str, Any]]) -> str:
    pareto = any("pareto" in r for r in rows)
    head = ["model", "NLL per token [95% CI]", "NLL increase over base [95% CI]", "NLL per char",
            "reward [95% CI]", "reward increase [95% CI]"] + (["Pareto front"] if pareto else [])
    body = []
    for i, r in enumerate(rows):
        cells = [html.escape(r["label"]) + (" (base)" if i == 0 else ""), _interval(r, "nll"),
                 _interval(r, "nll_increase", "+.4f"), _fmt(r["nll_per_char"], ".4f"),
                 _interval(r, "reward", "+.3f"), _interval(r, "reward_increase", "+.3f")]
        if pareto:
            cells.append("yes" if r.get("pareto") else "dominated")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f'<table class="methods"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr>'
            f"</thead><tbody>{''.join(body)}</tbody></table>")


def _category_table(rows: list[dict[str, Any]]) -> str:
    categories = list(rows[0]["nll_by_category"])
    head = "<th>model</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in categories)
    body = "".join("<tr><td>" + html.escape(r["label"]) + "</td>"
                   + "".join(f"<td>{_fmt(r['nll_by_category'][c], '.3f')}</td>" for c in categories) + "</tr>"
                   for r in rows)
    return f'<table class="methods"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _samples_table(rows: list[dict[str, Any]], limit: int) -> str:
    prompts = [s["prompt"] for s in rows[0].get("samples", [])][:limit]
    if not prompts:
        return "<p>no samples</p>"
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(r['label'])}</th>" for r in rows)
    body = []
    for k, prompt in enumerate(prompts):
        cells = [f"<td class='prompt'>{html.escape(prompt)}</td>"]
        for r in rows:
            s = r["samples"][k]
            cells.append(f"<td>{html.escape(s['completion'])}<div class='score'>reward "
                         f"{_fmt(s['reward'], '+.3f')}</div></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def write_tax_report(results: dict[str, Any], out_dir: str | Path, *, samples: int = 6) -> dict[str, Any]:
    """Write the files in the module docstring into `out_dir`; return their paths."""
    rows = list(results.get("models") or [])
    if not rows:
        raise ValueError("results['models'] must hold at least one model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reward_name = str(results.get("reward", "reward"))
    figures = [
        plot_interval_bars({"NLL per token": [{"label": r["label"], "value": r["nll"], "ci_low": r["nll_ci_low"],
                                               "ci_high": r["nll_ci_high"]} for r in rows]},
                           out / "tax_nll.png", ylabel="held-out NLL [nats per token]", interval="95% CI (bootstrap over passages)",
                           title="Capability: next-token NLL on general text (lower is better)", points=True,
                           value_format=".4f"),
        plot_interval_bars({reward_name: [{"label": r["label"], "value": r["reward"], "ci_low": r["reward_ci_low"],
                                           "ci_high": r["reward_ci_high"]} for r in rows]},
                           out / "tax_reward.png", ylabel=f"reward ({reward_name}), mean over prompts",
                           interval="95% CI (bootstrap over prompts)", title="Reward of greedy generations"),
    ]
    if len(rows) >= 3:
        points = [{"label": r["label"], "x": r["nll_increase"], "x_low": r["nll_increase_ci_low"],
                   "x_high": r["nll_increase_ci_high"], "y": r["reward"], "y_low": r["reward_ci_low"],
                   "y_high": r["reward_ci_high"], "front": r.get("pareto", False)} for r in rows]
        figures.append(plot_pareto(points, out / "tax_pareto.png", ylabel=f"reward ({reward_name}) of greedy "
                                   "generations (higher is better)"))
    (out / "tax.json").write_text(json.dumps(json_safe(results), indent=2))
    title = results.get("title") or "alignkit alignment-tax report"
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in results.get("notes") or [])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(str(results.get("task", "")))}</p>
<h2>Models</h2>
{_models_table(rows)}
<p class="notes">NLL: held-out next-token negative log-likelihood pooled over tokens (sum over passages
of each passage's summed NLL / its token count), every text token scored after a document-start
token. Increase: NLL(model) - NLL(base) on the same passages, interval from resampling passages for
both models at once. Reward: mean over prompts of one greedy generation each. Intervals: 95%
percentile bootstrap. A model is on the Pareto front when no other model has less NLL increase and
at least as much reward (or as little increase and more reward).</p>
<ul class="notes">{notes}</ul>
<h2>NLL per text category [nats per token]</h2>
{_category_table(rows)}
<h2>Plots</h2>
{"".join(_image(path, path.stem) for path in figures)}
<h2>Greedy samples side by side</h2>
{_samples_table(rows, samples)}
</body></html>
"""
    (out / "report.html").write_text(page)
    return {"html": out / "report.html", "results": out / "tax.json", "plots": figures}
