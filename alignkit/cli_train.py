"""Pieces of `alignkit train`'s command line: the overview `alignkit train --help` prints,
tyro's flag parsing with its errors turned into one line, and which fields were given."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import Any

_BOX_EDGES = "│╭╮╰╯"
_RULE = re.compile(r"^[─━-]+$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def train_overview(algorithms: dict[str, Any]) -> str:
    """`alignkit train --help` without an algorithm: how to call it, and every algorithm by kind."""
    by_kind: dict[str, list[str]] = {}
    for name, spec in algorithms.items():
        by_kind.setdefault(spec.kind, []).append(name)
    width = max(len(kind) for kind in by_kind) + 1
    lines = [
        "usage: alignkit train ALGO --model M --data D --output DIR [flags] [--set key=value ...]",
        "       alignkit train --config recipe.yaml [flags] [--set key=value ...]",
        "       alignkit train --resume RUN_DIR",
        "",
        "`alignkit train ALGO --help` documents every flag and ALGO's hyper-parameters;",
        "`alignkit algorithms` shows each algorithm's data format, models and paper.",
        "",
        "algorithms:",
    ]
    lines += [f"  {kind + ':':<{width}} {', '.join(names)}" for kind, names in by_kind.items()]
    return "\n".join(lines)


def box_sections(text: str) -> list[list[str]]:
    """The text of tyro's error box, split at its horizontal rules, without the title. tyro
    draws a UTF-8 box (title in the top border) when stdout is UTF-8, else a title line, a rule
    of dashes and indented content."""
    sections: list[list[str]] = [[]]
    lines = [_ANSI.sub("", raw).rstrip() for raw in text.splitlines()]
    lines = [line for line in lines if line.strip()]
    if lines and re.match(r"^ \S", lines[0]):  # the plain-text layout's title line
        lines = lines[1:]
    for line in lines:
        if line.lstrip().startswith(("╭", "╰")):
            continue
        body = line.strip().strip(_BOX_EDGES).strip()
        if _RULE.match(body):
            sections.append([])
        elif body:
            sections[-1].append(body)
    return [s for s in sections if s]


def one_line_parse_error(text: str) -> str:
    """tyro's boxed parse error as one line: the problem, and the flag it suggests instead."""
    sections = box_sections(text)
    parts, suggestions = [], []
    for section in sections:
        head = section[0]
        if head.startswith(("For full helptext", "Argument helptext")):
            continue
        if head.startswith("Perhaps you meant"):
            suggestions += [line.split()[0] for line in section[1:] if line.startswith("-")]
            continue
        parts.append(" ".join(section))
    message = " ".join(" ".join(parts).split()) or "could not parse the command line"
    if suggestions:
        message += f" (did you mean {' or '.join(dict.fromkeys(suggestions))}?)"
    return message + "; see alignkit train ALGO --help"


def parse_train_flags(argv: list[str], default: Any, description: str) -> Any:
    """`tyro.cli(TrainConfig, ...)`; a parse error becomes a ValueError of one line (tyro would
    print a box). Help still goes to stdout and exits 0."""
    import tyro

    from alignkit.training.run.config import TrainConfig

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            config = tyro.cli(TrainConfig, args=argv, default=default, prog="alignkit train",
                              description=description)
    except SystemExit as stop:
        if stop.code in (0, None):
            raise
        raise ValueError(one_line_parse_error(captured.getvalue())) from None
    sys.stderr.write(captured.getvalue())  # warnings of a successful parse
    return config


def explicit_fields(config: Any, baseline: Any) -> set[str]:
    """Fields whose value differs from `baseline` (the defaults, or the resumed run's config):
    what the command line, the recipe and --set gave."""
    from alignkit.training.run.config import field_types

    return {name for name in field_types() if getattr(config, name) != getattr(baseline, name)}
