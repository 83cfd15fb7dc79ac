"""Merge recipes: what `alignkit merge` and a `--ref-model merge:...` spec build.

A `MergeRecipe` names a method, its models and its coefficients. `merge_state(recipe, inputs)`
computes the merged state dict for every method that needs no data (interpolate, hma with
given ratios, soup, task_arithmetic, lines); `resolve_model_spec(spec)` builds such a merge in
memory and returns the model, so any place that loads a model by name can take a merge spec.

Spec strings (the first model is the base of interpolate, hma, task_arithmetic and lines):

    merge:interpolate:A,B:0.3            θ = 0.3 θ_A + 0.7 θ_B
    merge:soup:A,B,C                     uniform average
    merge:task_arithmetic:PRE,A,B:0.5    θ_pre + 0.5 τ_A + 0.5 τ_B   (or lambdas=0.3,0.6)
    merge:lines:PRE,FT:0.2               single-task LiNeS, α = 0.2, β = 1 − α (or beta=...)
    merge:lines:PRE,A,B:beta=0.5         multi-task LiNeS (α = ‖Σ τ_i‖₁ / ‖τ_MTL‖₁ / T)
    merge:hma:A,B:0.2,0.3,0.4            per-block ratios (or ratios=...:pivots=10,20:alpha=0.3)
    merge:recipe.yaml                    the same keys in a YAML mapping (method, base, models, ...)

After the models, `key=value` fields separated by `:` set alpha, beta, lambdas, ratios, pivots
and blocks; one bare field is the method's main coefficient (alpha for interpolate and lines,
lambdas for task_arithmetic, ratios for hma). Paths may not contain `:` or `,`.

Relative paths are made absolute when the spec is parsed: a spec string's against the working
directory (as on the command line), a recipe file's against the recipe file's directory. A run
placed on Ray ships `absolute_model_spec(spec)`, the same spec with absolute paths, so a worker
reads the same models whatever its working directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from alignkit.merge import methods
from alignkit.merge.io import MergeInput, layer_index_map, load_inputs, load_into
from alignkit.merge.methods import StateDict

log = logging.getLogger("alignkit")

METHODS = ("interpolate", "hma", "soup", "greedy_soup", "task_arithmetic", "lines")
WITH_BASE = ("interpolate", "hma", "task_arithmetic", "lines")
PREFIX = "merge:"
MAIN_COEFFICIENT = {"interpolate": "alpha", "lines": "alpha", "task_arithmetic": "lambdas", "hma": "ratios"}
LIST_FIELDS = {"lambdas": float, "ratios": float, "pivots": int}
SCALAR_FIELDS = {"alpha": float, "beta": float, "blocks": int}
USES = {  # the coefficients each method reads (any other one given is an error)
    "interpolate": {"alpha"},
    "hma": {"alpha", "ratios", "pivots", "blocks"},
    "soup": set(),
    "greedy_soup": set(),
    "task_arithmetic": {"lambdas"},
    "lines": {"alpha", "beta"},
}


@dataclass
class MergeRecipe:
    """A merge: `method`, the `base` (for WITH_BASE methods) and the other `models`, and the
    coefficients the method reads (None: not given)."""

    method: str
    models: list[str]
    base: str | None = None
    alpha: float | None = None
    beta: float | None = None
    lambdas: list[float] | None = None
    ratios: list[float] | None = None
    pivots: list[int] | None = None
    blocks: int | None = None

    def sources(self, base_flag: str = "--base", models_flag: str = "--models") -> list[tuple[str, str]]:
        """(source, label) of every model, the base first."""
        listed = [(m, f"{models_flag} {m}") for m in self.models]
        return ([(self.base, f"{base_flag} {self.base}")] if self.base is not None else []) + listed

    def coefficients(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("method", "models", "base") and v is not None}


def validate_recipe(recipe: MergeRecipe, *, where: str = "", data_driven: bool = False) -> None:
    """Check the recipe before anything loads; `data_driven`: HMA ratios will be learned (no
    --ratios needed) or the soup is greedy. Errors start with `where` (a flag or a file)."""
    at = f"{where}: " if where else ""
    if recipe.method not in METHODS:
        raise ValueError(f"{at}unknown merge method {recipe.method!r}; one of {', '.join(METHODS)}")
    name = recipe.method
    for key, value in recipe.coefficients().items():
        if key not in USES[name]:
            uses = ", ".join(sorted(USES[name])) or "no coefficients"
            raise ValueError(f"{at}{name} does not use {key} (it takes {uses})")
        numbers = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{at}{key} must be finite, got {value}")
    if name in WITH_BASE:
        if recipe.base is None:
            raise ValueError(f"{at}{name} needs a base model (--base, or the first model of a spec)")
        if name in ("interpolate", "hma") and len(recipe.models) != 1:
            raise ValueError(f"{at}{name} merges the base with exactly one other model, got {len(recipe.models)}")
        if not recipe.models:
            raise ValueError(f"{at}{name} needs at least one model besides the base")
    else:
        if recipe.base is not None:
            raise ValueError(f"{at}{name} averages its models alike and takes no base: list {recipe.base} with the others")
        if len(recipe.models) < 2:
            raise ValueError(f"{at}{name} needs at least 2 models, got {len(recipe.models)}")
    if name == "interpolate" and recipe.alpha is None and not data_driven:
        raise ValueError(f"{at}interpolate needs alpha (θ = α θ_base + (1 − α) θ_model)")
    if name == "task_arithmetic":
        if recipe.lambdas is None:
            raise ValueError(f"{at}task_arithmetic needs lambdas (one, or one per model)")
        if len(recipe.lambdas) not in (1, len(recipe.models)):
            raise ValueError(f"{at}task_arithmetic needs one lambda or one per model ({len(recipe.models)}), "
                             f"got {len(recipe.lambdas)}")
    if name == "lines":
        if len(recipe.models) == 1 and recipe.alpha is None and not data_driven:
            raise ValueError(f"{at}single-task lines needs alpha (β defaults to 1 − α)")
        if len(recipe.models) > 1:
            if recipe.alpha is not None:
                raise ValueError(f"{at}multi-task lines fixes α = ‖Σ τ_i‖₁ / ‖τ_MTL‖₁ / T (LiNeS); give beta only")
            if recipe.beta is None:
                raise ValueError(f"{at}multi-task lines needs beta (the paper tunes it on validation, 0.1-1.0)")
    if name == "hma":
        _validate_hma(recipe, at, data_driven)


def _validate_hma(recipe: MergeRecipe, at: str, data_driven: bool) -> None:
    if recipe.ratios is None and not data_driven:
        raise ValueError(f"{at}hma needs ratios (one per block), or --data to learn them")
    if recipe.ratios is not None and data_driven:
        raise ValueError(f"{at}hma takes ratios or --data (to learn them), not both")
    if recipe.ratios is not None and recipe.pivots is None and recipe.blocks is None:
        recipe.blocks = len(recipe.ratios)
    if recipe.pivots is not None and recipe.blocks is not None and recipe.blocks != len(recipe.pivots) + 1:
        raise ValueError(f"{at}{len(recipe.pivots)} pivots make {len(recipe.pivots) + 1} blocks, not {recipe.blocks}")
    count = len(recipe.pivots) + 1 if recipe.pivots is not None else recipe.blocks
    if recipe.ratios is not None and count != len(recipe.ratios):
        raise ValueError(f"{at}hma has {count} blocks but {len(recipe.ratios)} ratios; give one ratio per block")
    if recipe.alpha is None:
        if recipe.ratios is None:
            raise ValueError(f"{at}hma needs alpha (the mean ratio ᾱ the learned ratios keep)")
        recipe.alpha = sum(recipe.ratios) / len(recipe.ratios)
    if recipe.pivots is None and recipe.blocks is None:
        recipe.blocks = 3  # the reference's block3


def hma_layout(recipe: MergeRecipe, template: MergeInput) -> tuple[dict[str, int | None], list[int]]:
    """(parameter -> block index or None for ᾱ, block of each layer) for `template`'s model."""
    names = list(template.state)
    layer_of, num_layers = layer_index_map(template.model, names)
    blocks = methods.layer_blocks(num_layers, recipe.blocks, recipe.pivots)
    return methods.hma_groups(names, layer_of, blocks), blocks


def merge_state(recipe: MergeRecipe, inputs: list[MergeInput]) -> tuple[StateDict, dict[str, Any]]:
    """The merged state dict of a data-free recipe and what to record about it."""
    states = [one.state for one in inputs]
    name = recipe.method
    record: dict[str, Any] = {"method": name, **recipe.coefficients()}
    if name == "interpolate":
        return methods.interpolate(states[0], states[1], recipe.alpha), record
    if name == "soup":
        record["weights"] = [1.0 / len(states)] * len(states)
        return methods.uniform_soup(states), record
    if name == "task_arithmetic":
        lambdas = recipe.lambdas * len(recipe.models) if len(recipe.lambdas) == 1 else recipe.lambdas
        record["lambdas"] = lambdas
        return methods.task_arithmetic(states[0], states[1:], lambdas), record
    if name == "lines":
        return lines_state(recipe, inputs, record)
    if name == "hma":
        groups, blocks = hma_layout(recipe, inputs[0])
        record.update(layer_blocks=blocks, mean_ratio=recipe.alpha)
        return methods.hma_merge(states[0], states[1], groups, recipe.ratios, recipe.alpha), record
    raise ValueError(f"{name} needs held-out data: run `alignkit merge --method {name}` and use its output")


def lines_state(recipe: MergeRecipe, inputs: list[MergeInput], record: dict[str, Any]) -> tuple[StateDict, dict]:
    """Single task: τ = θ_ft − θ_pre, β = 1 − α unless given. Multi-task: τ_MTL = Σ_i τ_i (Task
    Arithmetic), α = ‖Σ τ_i‖₁ / ‖τ_MTL‖₁ / T (= 1/T), β given."""
    pre = inputs[0].state
    taus = [methods.task_vector(pre, one.state) for one in inputs[1:]]
    layer_of, num_blocks = layer_index_map(inputs[0].model, list(pre))
    if len(taus) == 1:
        tau, alpha = taus[0], recipe.alpha
        beta = 1.0 - alpha if recipe.beta is None else recipe.beta
    else:
        tau = {n: sum(t[n] for t in taus) for n in pre}
        alpha, beta = methods.lines_multi_task_alpha(taus, tau), recipe.beta
    record.update(alpha=alpha, beta=beta, num_blocks=num_blocks, form="single-task" if len(taus) == 1 else "multi-task",
                  block_scales=[alpha + beta * b / (num_blocks - 1) for b in range(num_blocks)] if num_blocks > 1 else [])
    return methods.lines(pre, tau, layer_of, num_blocks, alpha, beta), record


# --------------------------------------------------------------------------- spec strings


def is_merge_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _numbers(text: str, kind: type, where: str, key: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{where}: {key} must be {'integers' if kind is int else 'numbers'}, got {text!r}") from None


def _set_coefficient(values: dict[str, Any], key: str, raw: Any, where: str) -> None:
    if key in LIST_FIELDS:
        items = raw if isinstance(raw, list) else _numbers(str(raw), LIST_FIELDS[key], where, key)
        try:
            values[key] = [LIST_FIELDS[key](v) for v in items]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {key} must be a list of numbers, got {raw!r}") from None
    elif key in SCALAR_FIELDS:
        try:
            values[key] = SCALAR_FIELDS[key](raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {key} must be a number, got {raw!r}") from None
    else:
        known = ", ".join([*SCALAR_FIELDS, *LIST_FIELDS])
        raise ValueError(f"{where}: unknown merge coefficient {key!r}; one of {known}")


def absolute_source(source: str, base_dir: str | Path) -> str:
    """A model source as a process in any directory reads it: a local path made absolute against
    `base_dir` (normalised, symlinks kept); a hub id (`org/name`) or an alias (`smollm2-135m`)
    unchanged. A local path, as `models.sources.looks_like_path` reads one but under
    `base_dir`: `~/x` or absolute, starts with `.`, holds a backslash or more than one `/`, ends
    with `.gguf`, exists under `base_dir`, or its first component is a directory there.

    >>> absolute_source("./ckpt", "/runs"), absolute_source("smollm2-135m", "/runs")
    ('/runs/ckpt', 'smollm2-135m')
    """
    expanded = Path(source).expanduser()
    if expanded.is_absolute():
        return os.path.normpath(expanded)
    base = Path(base_dir).expanduser().absolute()
    spelled = source.startswith(".") or "\\" in source or source.count("/") > 1 or source.endswith(".gguf")
    if spelled or (base / expanded).exists() or ("/" in source and (base / source.split("/")[0]).is_dir()):
        return os.path.normpath(base / expanded)
    return source


def _split_spec(spec: str) -> tuple[str, list[str], str]:
    """`merge:METHOD:MODELS[:FIELDS]` -> (method, models, the fields text)."""
    body = spec[len(PREFIX):] if is_merge_spec(spec) else spec
    method, _, rest = body.partition(":")
    models_text, _, fields_text = rest.partition(":")
    return method, [m for m in models_text.split(",") if m], fields_text


def absolute_model_spec(spec: str) -> str:
    """The same merge spec with every local path absolute (`absolute_source` against the working
    directory; a recipe file: its own path, whose relative paths already read against its
    directory). A path that would then hold `:` or `,` is a ValueError: the spec could not be
    split again."""
    body = spec[len(PREFIX):] if is_merge_spec(spec) else spec
    if body.endswith((".yaml", ".yml")):
        return PREFIX + absolute_source(body, Path.cwd())
    method, models, fields_text = _split_spec(spec)
    absolute = [absolute_source(m, Path.cwd()) for m in models]
    for original, path in zip(models, absolute, strict=True):
        if path != original and (":" in path or "," in path):
            raise ValueError(f"merge spec {spec!r}: the absolute path of {original} ({path}) holds ':' or ',', "
                             "which a merge spec cannot carry; use a recipe file (merge:recipe.yaml)")
    return PREFIX + ":".join([method, ",".join(absolute), *([fields_text] if fields_text else [])])


def parse_model_spec(spec: str) -> MergeRecipe:
    """`merge:METHOD:MODELS[:FIELDS]` or `merge:FILE.yaml` -> a validated `MergeRecipe` whose
    local paths are absolute (module docstring)."""
    body = spec[len(PREFIX):] if is_merge_spec(spec) else spec
    if body.endswith((".yaml", ".yml")):
        return _recipe_from_yaml(body)
    method, models, fields_text = _split_spec(spec)
    models = [absolute_source(m, Path.cwd()) for m in models]
    if not method or not models:
        raise ValueError(f"merge spec {spec!r}: expected merge:METHOD:MODEL,MODEL[:COEFFICIENTS] or merge:recipe.yaml")
    values: dict[str, Any] = {}
    for index, item in enumerate(part for part in fields_text.split(":") if part):
        key, sep, raw = item.partition("=")
        if not sep:
            if index or method not in MAIN_COEFFICIENT:
                raise ValueError(f"merge spec {spec!r}: {item!r} needs a name (key=value)")
            key, raw = MAIN_COEFFICIENT[method], item
        _set_coefficient(values, key.strip(), raw, f"merge spec {spec!r}")
    base, others = (models[0], models[1:]) if method in WITH_BASE else (None, models)
    recipe = MergeRecipe(method, others, base, **values)
    validate_recipe(recipe, where=f"merge spec {spec!r}")
    return recipe


def _recipe_from_yaml(path: str) -> MergeRecipe:
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such merge recipe file")
    try:
        values = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a merge recipe must be a YAML mapping (method, base, models, coefficients)")
    known = {f.name for f in fields(MergeRecipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; a merge recipe has {', '.join(sorted(known))}")
    if "method" not in values or "models" not in values:
        raise ValueError(f"{path}: a merge recipe needs method and models")
    models = values["models"]
    models = [m for m in models.split(",") if m] if isinstance(models, str) else [str(m) for m in models]
    here = Path(path).expanduser().absolute().parent  # the recipe's paths read against its directory
    models = [absolute_source(m, here) for m in models]
    coefficients: dict[str, Any] = {}
    for key in known - {"method", "models", "base"}:
        if values.get(key) is not None:
            _set_coefficient(coefficients, key, values[key], path)
    base = None if values.get("base") is None else absolute_source(str(values["base"]), here)
    recipe = MergeRecipe(str(values["method"]), models, base, **coefficients)
    validate_recipe(recipe, where=path)
    return recipe


def check_model_spec(spec: str, flag: str = "--ref-model") -> None:
    """Parse a merge spec and check every model it names exists, before anything loads."""
    from alignkit.merge.io import check_source

    try:
        recipe = parse_model_spec(spec)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"{flag}: {error}") from None
    if recipe.method == "greedy_soup" or (recipe.method == "hma" and recipe.ratios is None):
        raise ValueError(f"{flag} {spec}: {recipe.method} needs data; run `alignkit merge` and pass its output directory")
    for source, _ in recipe.sources():
        check_source(source, f"{flag} {spec}: {'base' if source == recipe.base else 'model'}")


def model_spec_digest(spec: str, source_digest: Callable[[str], str]) -> str:
    """A hash of the recipe and of `source_digest(path)` of every input (the training layer
    passes its weight-file hash), for caches keyed on the reference."""
    from alignkit.models.loading import resolve_model_path

    recipe = parse_model_spec(spec)
    digests = []
    for source, _ in recipe.sources():
        path = source if Path(source).expanduser().is_dir() else resolve_model_path(source)
        digests.append(source_digest(str(Path(path).expanduser())))
    text = json.dumps({"recipe": asdict(recipe), "inputs": digests}, sort_keys=True)
    return "merge:" + hashlib.sha256(text.encode()).hexdigest()


def resolve_model_and_tokenizer(spec: str, *, dtype: Any = None, device: str | None = None,
                                trust_remote_code: bool = False, flag: str = "--ref-model") -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a model source or a merge spec (built in memory; the tokenizer is
    the base's, or the first model's for soups)."""
    from alignkit.models.loading import default_device, load_model, resolve_dtype

    if not is_merge_spec(spec):
        return load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    check_model_spec(spec, flag)
    recipe = parse_model_spec(spec)
    inputs = load_inputs(recipe.sources(f"{flag} {spec}: base", f"{flag} {spec}: model"),
                         trust_remote_code=trust_remote_code)
    state, record = merge_state(recipe, inputs)
    model = load_into(inputs[0].model, {**state, **inputs[0].fixed}, inputs[0].aliases)
    device = device or default_device()
    log.info("%s: merged in memory (%s)", flag, ", ".join(f"{k}={v}" for k, v in record.items()))
    return model.to(device=device, dtype=resolve_dtype(dtype, device)).eval(), inputs[0].tokenizer


def resolve_model_spec(spec: str, *, dtype: Any = None, device: str | None = None,
                       trust_remote_code: bool = False, flag: str = "--ref-model") -> nn.Module:
    """The model a spec names: a merge spec (module docstring) merged in memory, anything else
    loaded with `load_model`. dtype/device as `load_model` (None: bf16 on a GPU, else float32)."""
    return resolve_model_and_tokenizer(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                       flag=flag)[0]
