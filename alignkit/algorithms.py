"""Every trainable algorithm by name: kind, data format, models held in memory, paper.

`alignkit algorithms` prints this table and the README's table is generated from it, so
neither can drift from the code.
"""

from __future__ import annotations

import alignkit.training  # noqa: F401  (registers every algorithm)
from alignkit.training.run.registry import ALGORITHMS, AlgorithmSpec

__all__ = ["ALGORITHMS", "AlgorithmSpec", "algorithms_table", "readme_with_table"]


def algorithms_table(markdown: bool = False) -> str:
    """The registry as an aligned text table, or a Markdown table for the README."""
    header = ("name", "kind", "data", "models in memory", "paper")
    rows = [(s.name, s.kind, s.data, s.models, s.paper) for s in ALGORITHMS.values()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        cells = [[f"`{r[0]}`", *(markdown_cell(c) for c in r[1:])] for r in rows]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


def markdown_cell(text: str) -> str:
    """A table cell: `|` (one data format or another) escaped so it does not split the row."""
    return str(text).replace("|", "\\|")


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
