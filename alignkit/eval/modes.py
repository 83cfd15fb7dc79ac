"""Mode share over training (Zhao et al. 2025, "Echo Chamber: RL Post-training Amplifies
Behaviors Learned in Pretraining"): the share of a policy's outputs in each format or mode class,
per checkpoint, to see RL collapse onto one mode of what pretraining taught.

A class set is an ordered table of names and regular expressions (YAML or JSON: `name: regex`,
or a list of `{name, pattern}`), each output taking the FIRST class whose pattern it contains
(`re.search`), `other` when none; or a Python classifier `file.py:fn` / `module:fn` called as
`fn(prompts, completions) -> list[str]` (one label per completion; its optional `classes`
attribute fixes the order of the labels in reports). The paper classifies GSM8K outputs by
their format (code-like TinyGSM vs natural-language OpenMathInstruct); any regexes that tell
formats apart play that part here.

  share_c(step) = #{outputs of the step's checkpoint labelled c} / #{outputs}
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OTHER = "other"
Classifier = Callable[[list[str], list[str]], list[str]]


def regex_classifier(patterns: Sequence[tuple[str, str]]) -> Classifier:
    """A classifier giving each completion the first class whose pattern it contains, else
    `other`. Patterns are compiled here, so a bad one fails before any sampling."""
    compiled = [(name, re.compile(pattern, re.MULTILINE)) for name, pattern in patterns]

    def classify(prompts: list[str], completions: list[str]) -> list[str]:
        return [next((name for name, rx in compiled if rx.search(text)), OTHER) for text in completions]

    return classify


def read_class_table(path: Path) -> list[tuple[str, str]]:
    """(name, pattern) pairs of a YAML/JSON class file, in file order; one-line errors naming
    the file and the entry."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--classes {path}: cannot read it: {str(err).splitlines()[0]}") from None
    if isinstance(data, dict):
        entries = list(data.items())
    elif isinstance(data, list) and all(isinstance(e, dict) for e in data):
        entries = [(e.get("name"), e.get("pattern")) for e in data]
    else:
        raise ValueError(f"--classes {path}: expected a mapping name: regex or a list of {{name, pattern}}")
    if not entries:
        raise ValueError(f"--classes {path}: no classes")
    pairs = []
    for i, (name, pattern) in enumerate(entries, 1):
        if not isinstance(name, str) or not name or not isinstance(pattern, str) or not pattern:
            raise ValueError(f"--classes {path}: entry {i} needs a name and a regex string, got {name!r}: {pattern!r}")
        if name == OTHER:
            raise ValueError(f"--classes {path}: '{OTHER}' is the class of outputs no pattern matches; rename entry {i}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"--classes {path}: class {name!r}: bad regex {pattern!r}: {err}") from None
        pairs.append((name, pattern))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"--classes {path}: a class name repeats")
    return pairs


def checked_labels(labels: Any, count: int, spec: str) -> list[str]:
    """The classifier's output as `count` strings, or a one-line error naming `spec`."""
    if not isinstance(labels, (list, tuple)) or len(labels) != count:
        raise ValueError(f"--classes {spec}: the classifier must return {count} labels, "
                         f"got {type(labels).__name__} of length {len(labels) if hasattr(labels, '__len__') else '?'}")
    if not all(isinstance(label, str) for label in labels):
        raise ValueError(f"--classes {spec}: every label must be a string")
    return list(labels)


def mode_shares(labels: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """share_c = count_c / len(labels) for every c in `names`, and for any other label seen
    (appended in order of first appearance). The shares sum to 1."""
    if not labels:
        raise ValueError("mode_shares needs at least one label")
    order = list(names) + [label for label in dict.fromkeys(labels) if label not in names]
    return {name: sum(label == name for label in labels) / len(labels) for name in order}


def dominant_mode(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The class with the largest share at the last point, and its share at the first and
    last points: the amplification the paper reports."""
    first, last = points[0]["shares"], points[-1]["shares"]
    name = max(last, key=last.get)
    return {"class": name, "first_share": first.get(name, 0.0), "last_share": last[name]}


def plot_mode_shares(points: Sequence[dict[str, Any]], names: Sequence[str], path: str | Path,
                     title: str = "Mode share over training") -> Path:
    """Stacked areas of each class's share (y, 0-1) against the checkpoint's step (x)."""
    from alignkit.eval.plots import COLORS, _pyplot, _save

    plt = _pyplot()
    steps = [p["step"] for p in points]
    shares = np.array([[p["shares"].get(name, 0.0) for p in points] for name in names])  # (C, P)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = [COLORS[i % len(COLORS)] if name != OTHER else "#bbbbbb" for i, name in enumerate(names)]
    ax.stackplot(steps, shares, labels=list(names), colors=colors, alpha=0.85)
    ax.set_xlabel("training step (0 = initial model)")
    ax.set_ylabel("share of sampled outputs")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def write_modes_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
