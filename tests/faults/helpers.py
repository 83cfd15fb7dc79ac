"""Running the CLI in-process and checking that a mistake ends as one line.

Every fault case in this folder tries one bad input or fault a user can hit and asserts how
alignkit handles it. `python tests/faults/report.py` runs them and writes the table of
docs/reliability.md: a case that passes is *handled*; one marked
`pytest.mark.xfail(strict=True, reason=...)` documents a fault not handled yet and is counted
as *lost*."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, NamedTuple


class CliRun(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(*argv: str) -> CliRun:
    """`alignkit ARGV...` in this process; SystemExit is turned into its exit code."""
    from alignkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
            if isinstance(stop.code, str):
                err.write(stop.code + "\n")
    return CliRun(int(code or 0), out.getvalue(), err.getvalue())


def assert_one_line_error(run: CliRun, verb: str, *needles: str, code: int = 2) -> str:
    """The run failed with exit `code`, printed `alignkit VERB: error: ...` naming every needle,
    and no traceback. Returns the error line."""
    assert run.code == code, f"exit {run.code}, stderr:\n{run.err}"
    assert "Traceback" not in run.err, run.err
    prefix = f"alignkit {verb}: error: "
    lines = [line for line in run.err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one line starting {prefix!r}, stderr:\n{run.err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n: int = 8) -> list[dict[str, str]]:
    """n distinct preference pairs in the plain (prompt, chosen, rejected) schema."""
    return [
        {"prompt": f"Question {i}: say something", "chosen": f"a good answer {i}", "rejected": f"bad {i}"}
        for i in range(n)
    ]
