"""Every trainable algorithm by name. A module that adds algorithms registers an
`AlgorithmSpec` whose `make_task(config)` builds what the loop optimises; `alignkit algorithms`
and the README's table are generated from this registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    kind: str
    """sft, reward, pairwise, listwise, unpaired, online, ..."""
    data: str
    """Dataset columns it reads."""
    models: str
    """Models held in memory while training."""
    paper: str
    make_task: Callable[[Any], Any]
    """config -> task object for the loop named by `runner`."""
    runner: str = "offline"
    """Which loop trains it: offline (alignkit.training.offline.loop) or online."""


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register_algorithm(spec: AlgorithmSpec) -> AlgorithmSpec:
    if spec.name in ALGORITHMS:
        raise ValueError(f"algorithm {spec.name!r} is registered twice")
    ALGORITHMS[spec.name] = spec
    return spec


def first_docstring_line(fn: Any) -> str:
    """The paper citation that opens a loss docstring: "DPO (Rafailov et al. 2023)"."""
    import inspect

    doc = inspect.getdoc(fn) or ""
    first_paragraph = " ".join(doc.split("\n\n")[0].split())
    return first_paragraph.split(": ")[0].rstrip(":").strip()
