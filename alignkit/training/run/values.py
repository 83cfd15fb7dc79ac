"""Reading option values: YAML with YAML 1.2 numbers, `key=value` pairs, and type checks.

PyYAML implements YAML 1.1, which reads `1e-4` (no dot) and `1.0e5` (unsigned exponent) as
strings; YAML 1.2, and every user, reads them as floats. `load_yaml` and `parse_scalar` use a
loader that adds the YAML 1.2 float forms and is otherwise PyYAML's safe loader.

`coerce_field` checks a value against a `TrainConfig` field's annotation, `hparam_type_error`
a hyper-parameter against the type of its default; both name the key and the expected type.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does (1e-4 and 1.0e5 are floats)."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with YAML 1.2 numbers; a syntax error names `source` and the line."""
    try:
        return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{where}: YAML syntax error: {problem}") from None


def load_yaml_file(path: str | Path) -> Any:
    """`load_yaml` of a file; a missing file is a FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return load_yaml(path.read_text(), str(path))


def yaml_comment_start(text: str) -> int | None:
    """Where a YAML comment starts in one line of flow YAML: a `#` at the start or after
    whitespace, outside quotes (`a #b` -> 2; `a#b`, `'a #b'` -> None)."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"" and (i == 0 or text[i - 1] in " \t[{,:"):
            quote = char
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return i
    return None


def parse_scalar(raw: str, key: str) -> Any:
    """A `--set` value read as YAML (numbers, true/false, null, lists, mappings); an empty
    value is the empty string. A ` #` outside quotes is refused: YAML would read it as a
    comment and silently drop the rest (`--set judges=regex:a #b` would judge `regex:a`)."""
    if not raw.strip():
        return ""
    if (start := yaml_comment_start(raw)) is not None:
        raise ValueError(f"--set {key}={raw}: '{raw[start:]}' would be read as a YAML comment and dropped; "
                         f"quote the value (--set \"{key}='...'\") or remove the '#'")
    return load_yaml(raw, f"--set {key}={raw}")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               type(None): "null"}


def allowed_types(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (`float | None` -> (float, NoneType)), else itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def describe_types(allowed: tuple[Any, ...]) -> str:
    """'an integer', 'a number or null', ... for an error message."""
    return " or ".join(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def coerce_field(key: str, value: Any, annotation: Any) -> Any:
    """`value` checked against a field annotation made of bool, int, float, str and None.

    Ints are accepted (and converted) where a float is expected, path objects where a string
    is; anything else of the wrong type is a ValueError naming `key` and the expected type.
    Annotations of other types are not checked.
    """
    allowed = allowed_types(annotation)
    if not set(allowed) <= set(_TYPE_WORDS):
        return value
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif _is_int(value) and int in allowed:
        return value
    elif isinstance(value, int | float) and float in allowed:
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    elif isinstance(value, os.PathLike) and str in allowed:
        return os.fspath(value)
    raise ValueError(f"{key} must be {describe_types(allowed)}, got {value!r}")


def hparam_type_error(key: str, value: Any, default: Any) -> str | None:
    """Why `value` does not fit a hyper-parameter whose default is `default`, or None.

    Only defaults of a known scalar type are checked: bool, int, float (ints accepted) and
    str. A default of None, `...` (required) or no default says nothing about the type."""
    expected = type(default)
    if expected not in (bool, int, float, str):
        return None
    fits = {
        bool: isinstance(value, bool),
        int: _is_int(value),
        float: _is_int(value) or isinstance(value, float),
        str: isinstance(value, str),
    }[expected]
    return None if fits else f"{key} must be {_TYPE_WORDS[expected]}, got {value!r}"


def coerce_fields(cls: type, values: dict[str, Any], context: str) -> dict[str, Any]:
    """`values` for the fields of dataclass `cls`, each checked by `coerce_field` against its
    annotation; an error is prefixed with `context` (e.g. the algorithm's name)."""
    hints = typing.get_type_hints(cls)
    coerced = {}
    for key, value in values.items():
        try:
            coerced[key] = coerce_field(key, value, hints[key]) if key in hints else value
        except ValueError as error:
            raise ValueError(f"{context}: {error}") from None
    return coerced
