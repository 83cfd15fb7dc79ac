"""Package layering (DESIGN.md, "Layers"): data flows top to bottom and each layer imports only
the layers below it (or itself). Checked statically with `ast` over every source file, so
imports inside functions (lazy imports) count like top-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

import alignkit

PACKAGE = Path(alignkit.__file__).parent

# Rank of each layer: a layer may import layers of lower or equal rank. Equal rank = one layer
# (objectives/ and advantages.py are both "pure maths").
LAYERS: dict[str, int] = {
    "data": 0,
    "models": 1,
    "objectives": 2,
    "advantages": 2,
    "eval": 3,  # metrics, over-optimisation fits, plots, reports
    "rewards": 4,
    "rollout": 5,
    "agents": 5,  # multi-turn rollouts: conversations with tools and environments on a rollout engine
    "lab": 6,  # sample a policy, score it with rewards, measure it with eval/
    "merge": 6,  # model-space methods: weights in, a checkpoint out (lab/'s rank: each uses the other)
    "training": 7,  # may import everything below it
    "diffusion": 7,  # d3po/prdp on diffusers: part of training/ (training/ registers them)
    "sweep": 8,  # hyper-parameter search: trains recipes through training/, reports through eval/
}
# The command line and the public entry points sit on top and may import anything.
TOP = {"__init__", "__main__", "cli", "cli_args", "cli_eval_rm", "cli_train", "demo", "api", "algorithms", "testing", "testing_vlm", "testing_diffusion"}


def layer_of_file(path: Path) -> str:
    """`alignkit/eval/kl.py` -> "eval"; `alignkit/cli.py` -> "cli"."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def layer_of_module(module: str) -> str | None:
    """`alignkit.rewards.base` -> "rewards"; `alignkit` -> "__init__"; non-alignkit -> None."""
    parts = module.split(".")
    if parts[0] != "alignkit":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _package_of(path: Path) -> list[str]:
    parts = ["alignkit", *path.relative_to(PACKAGE).parts]
    return parts[:-1]  # the directory's dotted parts (an __init__.py's package is its folder)


def imported_modules(source: str, path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in `source`, wherever it sits: `import a.b`,
    `from a.b import c` (and `from alignkit import rewards` as `alignkit.rewards`), relative
    imports resolved against `path`, and `importlib.import_module("literal")`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path)[: len(_package_of(path)) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "alignkit":  # `from alignkit import eval` imports the subpackage
                found.extend(
                    (node.lineno, f"alignkit.{a.name}" if a.name in LAYERS.keys() | TOP else module)
                    for a in node.names
                )
            else:
                found.append((node.lineno, module))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def violations(path: Path, source: str | None = None) -> list[str]:
    """Imports in `path` that point at a layer above its own (or at an unknown one)."""
    source = path.read_text() if source is None else source
    importer = layer_of_file(path)
    if importer in TOP:
        return []
    rank = LAYERS[importer]
    bad = []
    for line, module in imported_modules(source, path):
        target = layer_of_module(module)
        if target is None or target == importer:
            continue
        target_rank = LAYERS.get(target, float("inf"))  # TOP or unknown: above everything
        if target_rank > rank:
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} imports {module}")
    return bad


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_source_file_belongs_to_a_known_layer():
    unknown = {layer_of_file(p) for p in source_files()} - set(LAYERS) - TOP
    assert not unknown, f"place {sorted(unknown)} in LAYERS (and in DESIGN.md's layer table)"


def test_each_layer_imports_only_the_layers_below_it():
    found = [v for path in source_files() for v in violations(path)]
    assert not found, "upward imports:\n" + "\n".join(found)


def test_eval_imports_only_data_models_and_maths():
    allowed = {"eval", "data", "models", "objectives", "advantages"}
    targets = {
        layer_of_module(module)
        for path in source_files()
        if layer_of_file(path) == "eval"
        for _, module in imported_modules(path.read_text(), path)
    } - {None}
    assert targets <= allowed, f"eval/ imports {sorted(targets - allowed)}"


def test_the_checker_sees_lazy_relative_and_dynamic_imports():
    path = PACKAGE / "eval" / "example.py"
    source = (
        "import importlib\n"
        "from alignkit.eval.stats import bootstrap_ci\n"
        "from alignkit.models import load_model\n"
        "def f():\n"
        "    from alignkit.rewards import score_safely\n"
        "    from ..rollout import HFEngine\n"
        "    from alignkit import demo\n"
        "    return importlib.import_module('alignkit.lab')\n"
    )
    found = violations(path, source)
    assert [v.split(": ", 1)[1] for v in found] == [
        "eval imports alignkit.rewards",
        "eval imports alignkit.rollout",
        "eval imports alignkit.demo",
        "eval imports alignkit.lab",
    ]
    assert violations(PACKAGE / "cli.py", source) == []
