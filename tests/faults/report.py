"""Run the fault cases and write their table into docs/reliability.md.

    python tests/faults/report.py          # runs pytest on tests/faults, rewrites the table

Each case's area is its module (test_rundir.py -> rundir), its text the first line of its
docstring. handled = the case passes; lost = a strict xfail (a known fault, not handled yet)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent.parent / "docs" / "reliability.md"
BEGIN, END = "<!-- fault table: begin -->", "<!-- fault table: end -->"


def case_texts() -> dict[str, str]:
    """'test_x.py::test_name' -> first docstring line, read from the source (no import)."""
    texts = {}
    for path in sorted(HERE.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                doc = (ast.get_docstring(node) or node.name).strip().splitlines()[0]
                texts[f"{path.name}::{node.name}"] = doc
    return texts


def table(outcomes: list[dict]) -> str:
    texts = case_texts()
    rows, counts = [], Counter()
    for item in outcomes:
        file_and_name = item["nodeid"].split("tests/faults/")[-1]
        base = file_and_name.split("[")[0]
        area = base.split("::")[0].removeprefix("test_").removesuffix(".py")
        counts[item["outcome"]] += 1
        counts[(area, item["outcome"])] += 1
        case = file_and_name[len(base):]  # the parameter id of a parametrized case, if any
        text = (texts.get(base, base) + (f" {case}" if case else "")).replace("|", chr(92) + "|")
        rows.append(f"| {area} | {text} | {item['outcome']} |")
    areas = sorted({r.split(" | ")[0][2:] for r in rows})
    summary = [
        f"Tried {len(outcomes)}: handled {counts['handled']}, lost {counts['lost']}"
        + (f", failing {counts['failed']}" if counts["failed"] else "")
        + (f", skipped {counts['skipped']}" if counts["skipped"] else "") + ".",
        "",
        "| area | tried | handled | lost |",
        "|---|---|---|---|",
    ]
    for area in areas:
        tried = sum(counts[(area, o)] for o in ("handled", "lost", "failed", "skipped"))
        summary.append(f"| {area} | {tried} | {counts[(area, 'handled')]} | {counts[(area, 'lost')]} |")
    return "\n".join(summary + ["", "| area | fault tried -> expected handling | result |", "|---|---|---|"] + rows)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outcomes.json"
        env = dict(os.environ, ALIGNKIT_FAULT_OUTCOMES=str(path))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE)], env=env)
        outcomes = json.loads(path.read_text())
    text = DOC.read_text() if DOC.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{table(outcomes)}\n{END}{tail}")
    print(table(outcomes).split("\n\n")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
