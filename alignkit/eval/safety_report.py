"""The `alignkit safety` report: `write_safety_report(results, out_dir)` writes

  report.html       one file, the plot embedded: refusal and over-refusal rates per model with
                    95% intervals (the deciding verdict, the rules alone, the judge alone), with
                    a baseline the paired change of both rates and, by name, every prompt whose
                    behaviour changed (with both responses), then every response and its verdict;
  safety_rates.png  refusal rate on harmful prompts and over-refusal rate on benign ones per
                    model, 95% bootstrap intervals over prompts;
  safety.json       `results` (NaN/inf written as null).

`results` is what `alignkit.lab.safety_lab.run_safety` builds: "models" {role: summary},
"prompts" {"harmful" / "benign": rows with each role's verdict}, "changes", "rate_changes".
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from alignkit.eval.measure_plots import plot_interval_bars
from alignkit.eval.report import _CSS, _fmt, _image, json_safe
from alignkit.eval.tax import short_names

SETS = ("harmful", "benign")
CHANGE_TITLES = {
    ("harmful", "now_complies"): "Harmful requests refused by the baseline and answered now (safety lost)",
    ("harmful", "now_refuses"): "Harmful requests answered by the baseline and refused now",
    ("benign", "now_refuses"): "Harmless requests answered by the baseline and refused now (over-refusal gained)",
    ("benign", "now_complies"): "Harmless requests refused by the baseline and answered now",
}


def _rate(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "&ndash;"
    return (f"{_fmt(rate['rate'])} [{_fmt(rate['ci_low'])}, {_fmt(rate['ci_high'])}] "
            f"({rate['count']}/{rate['n']})")


def _summary_table(results: dict[str, Any]) -> str:
    judged = results.get("judge") is not None
    head = ["", "model", "refusal on harmful [95% CI]", "over-refusal on benign [95% CI]"]
    if judged:
        head += ["rules only: refusal / over-refusal", "judge only: refusal / over-refusal",
                 "judge-rules agreement (harmful / benign)"]
    body = []
    for role, m in results["models"].items():
        cells = [role, html.escape(m["name"]), _rate(m["refusal"]), _rate(m["over_refusal"])]
        if judged:
            cells += [f"{_rate(m['refusal_by_rules'])} / {_rate(m['over_refusal_by_rules'])}",
                      f"{_rate(m.get('refusal_by_judge'))} / {_rate(m.get('over_refusal_by_judge'))}",
                      f"{_fmt(m.get('refusal_judge_rules_agreement'))} / "
                      f"{_fmt(m.get('over_refusal_judge_rules_agreement'))}"]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f'<table class="methods"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr>'
            f"</thead><tbody>{''.join(body)}</tbody></table>")


def _verdict(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "&ndash;"
    verdict = "refused" if entry["refused"] else "complied"
    why = [f"rule {entry['rule']}" if entry["rule"] else "no rule"]
    if entry.get("judge_p") is not None:
        why.append(f"judge p {entry['judge_p']:.2f}")
    return (f"{html.escape(entry['response']) or '<em>(empty)</em>'}<div class='score'>{verdict} "
            f"({html.escape(', '.join(why))})</div>")


def _prompt_rows(rows: list[dict[str, Any]], roles: list[str]) -> str:
    head = "<th>id</th><th>prompt</th>" + "".join(f"<th>{html.escape(r)}</th>" for r in roles)
    body = "".join(f"<tr><td>{html.escape(p['id'])}</td><td class='prompt'>{html.escape(p['prompt'])}</td>"
                   + "".join(f"<td>{_verdict(p.get(r))}</td>" for r in roles) + "</tr>" for p in rows)
    return f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _changes_section(results: dict[str, Any]) -> str:
    changes = results.get("changes")
    if not changes:
        return ""
    rate_changes = results["rate_changes"]
    parts = ["<h2>Changes against the baseline</h2>",
             "<p>Change of each rate (model minus baseline, same prompts; 95% paired bootstrap interval): "
             f"refusal on harmful {_fmt(rate_changes['refusal']['change'], '+.3f')} "
             f"[{_fmt(rate_changes['refusal']['ci_low'], '+.3f')}, {_fmt(rate_changes['refusal']['ci_high'], '+.3f')}], "
             f"over-refusal on benign {_fmt(rate_changes['over_refusal']['change'], '+.3f')} "
             f"[{_fmt(rate_changes['over_refusal']['ci_low'], '+.3f')}, "
             f"{_fmt(rate_changes['over_refusal']['ci_high'], '+.3f')}].</p>"]
    for (kind, direction), title in CHANGE_TITLES.items():
        ids = changes[kind][direction]
        parts.append(f"<h3>{html.escape(title)}: {len(ids)}</h3>")
        if ids:
            wanted = set(ids)
            rows = [p for p in results["prompts"][kind] if p["id"] in wanted]
            parts.append(_prompt_rows(rows, ["baseline", "model"]))
    return "\n".join(parts)


def write_safety_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write the files in the module docstring into `out_dir`; return their paths."""
    models = results.get("models") or {}
    if "model" not in models:
        raise ValueError("results['models'] must hold the 'model' entry")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = dict(zip(models, short_names([m["name"] for m in models.values()]), strict=True))
    label = {role: f"{role}\n{names[role]}" for role in models}
    series = {
        "refusal on harmful prompts (higher is safer)": [
            {"label": label[role], "value": m["refusal"]["rate"], "ci_low": m["refusal"]["ci_low"],
             "ci_high": m["refusal"]["ci_high"]} for role, m in models.items()],
        "over-refusal on benign prompts (lower is better)": [
            {"label": label[role], "value": m["over_refusal"]["rate"], "ci_low": m["over_refusal"]["ci_low"],
             "ci_high": m["over_refusal"]["ci_high"]} for role, m in models.items()],
    }
    figure = plot_interval_bars(series, out / "safety_rates.png", ylabel="fraction of prompts refused",
                                interval="95% CI (bootstrap over prompts)", value_format=".2f",
                                title=f"Refusal and over-refusal (verdicts: {results.get('decided_by', 'rules')})")
    (out / "safety.json").write_text(json.dumps(json_safe(results), indent=2))
    title = results.get("title") or "alignkit safety report"
    roles = list(models)
    judge = results.get("judge")
    decided = (f"judge {html.escape(str(judge))} (refused iff p &gt; {results.get('judge_threshold')}); the rules "
               "alone and their agreement are shown beside it" if judge else "the refusal rules below")
    rules = "".join(f"<li><code>{html.escape(name)}</code>: <code>{html.escape(pattern)}</code></li>"
                    for name, pattern in (results.get("rules") or {}).items())
    sets = "".join(f"<h3>{kind} prompts</h3>{_prompt_rows(results['prompts'][kind], roles)}" for kind in SETS)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(str(results.get("task", "")))}</p>
<h2>Rates</h2>
{_summary_table(results)}
<p class="notes">Refusal: fraction of harmful requests refused (higher is safer). Over-refusal: fraction
of harmless look-alike requests refused (lower is better). One greedy response per prompt; intervals:
95% percentile bootstrap over prompts. Verdicts decided by {decided}.</p>
{_image(figure, figure.stem)}
{_changes_section(results)}
<h2>Every response</h2>
{sets}
<h2>Refusal rules</h2>
<p class="notes">A response is refused when any pattern (case-insensitive) matches its opening: the first
two sentences, at most 300 characters (<code>alignkit.eval.refusal</code>).</p>
<ul class="notes">{rules}</ul>
</body></html>
"""
    (out / "report.html").write_text(page)
    return {"html": out / "report.html", "results": out / "safety.json", "plots": [figure]}
