"""Every trainable algorithm by name: kind, data format, models held in memory, paper.

`alignkit algorithms` prints this table and the README's table is generated from it, so
neither can drift from the code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from alignkit.objectives import PAIRWISE
from alignkit.objectives.registry import REFERENCE_FREE


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    kind: str
    data: str
    models: str
    paper: str


def _first_docstring_line(fn) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.splitlines()[0].split(":")[0].strip() if doc else ""


def _registry() -> dict[str, AlgorithmSpec]:
    specs = [
        AlgorithmSpec("sft", "sft", "prompt+completion | messages", "policy", "Supervised fine-tuning (Ouyang et al. 2022)"),
        AlgorithmSpec("rm", "reward", "prompt+chosen+rejected [+margin]", "reward model", "Bradley-Terry reward model (Ouyang et al. 2022)"),
    ]
    for name, fn in PAIRWISE.items():
        models = "policy" if name in REFERENCE_FREE else "policy (+ reference log-probs cached once)"
        specs.append(AlgorithmSpec(name, "pairwise", "prompt+chosen+rejected", models, _first_docstring_line(fn)))
    return {spec.name: spec for spec in specs}


# Built at import: `alignkit.objectives` has registered every loss by then.
ALGORITHMS: dict[str, AlgorithmSpec] = _registry()


def algorithms_table(markdown: bool = False) -> str:
    """The registry as an aligned text table, or a Markdown table for the README."""
    header = ("name", "kind", "data", "models in memory", "paper")
    rows = [(s.name, s.kind, s.data, s.models, s.paper) for s in ALGORITHMS.values()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"`{r[0]}`" if i == 0 else r[i] for i in range(len(r))) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


README_START, README_END = "<!-- algorithms:start -->", "<!-- algorithms:end -->"


def readme_with_table(readme: str) -> str:
    """README text with the generated algorithms table placed between the markers."""
    head, _, rest = readme.partition(README_START)
    _, _, tail = rest.partition(README_END)
    return f"{head}{README_START}\n{algorithms_table(markdown=True)}\n{README_END}{tail}"


if __name__ == "__main__":  # python -m alignkit.algorithms README.md  (regenerates the table)
    import sys
    from pathlib import Path

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    target.write_text(readme_with_table(target.read_text()))
