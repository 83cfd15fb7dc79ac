"""Turn a reward spec string (from the command line or a recipe) into a reward function.

Spec forms, tried in this order:

- `http://HOST:PORT/PATH[#batch_size=N&timeout=S&retries=R]` - a reward server
  (`alignkit serve-rm`'s `/score`, or any other path in OpenRLHF's remote_rm_url protocol;
  `alignkit.rewards.http_reward`);
- `rm:DIR` or an existing directory - a saved reward model (plain sequence classifier,
  ensemble, BRME, ArmoRM, embedding RM, principle-following or VPL RM) through
  `alignkit.rewards.load_reward_model`; `rm:DIR,principles=FILE` gives an rm_principles model
  its principles, `rm:DIR,user_context=FILE` an rm_vpl model its user's labelled pairs;
  `rm:DIR,fusion_index=TRAIN.jsonl[,fusion_k=5,fusion_min_sim=0.9]` wraps it in RewardFusion
  (`alignkit.rewards.fusion`);
- a built-in name: `vader`, `length` (needs `target=`) or `length:TARGET`, `json_valid`,
  `numeric_match`, `regex:PATTERN` (everything after the first colon is the pattern), and the
  visual ones `iou` (boxes vs a `boxes` column), `choice_accuracy` (vs an `answer` column),
  `think_format` (`alignkit.rewards.visual`);
- `judge:MODEL[,mode=pairwise,template=FILE,...]` - a causal LM as a pointwise or pairwise
  judge (`alignkit.rewards.judge`; MODEL a directory, hub id or `smollm2-135m`);
- `path/to/file.py:function` - a Python file loaded by path (ends in `.py` or contains a
  path separator before the colon);
- `package.module:function` - imported with importlib.

If the named attribute is a class it is instantiated with `**kwargs` (so
`"alignkit.rewards:LengthTarget"` with `target=50` works); a plain function is wrapped so
that it always returns a float32 tensor via `as_reward_tensor`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from alignkit.rewards.base import RewardFunction, invoke_reward
from alignkit.rewards.outputs import RewardOutputError, as_reward_tensor
from alignkit.rewards.rules import (
    JsonValid,
    LengthTarget,
    NumericAnswerMatch,
    RegexMatch,
    VaderSentiment,
)
from alignkit.rewards.visual import BoxIoU, ChoiceAccuracy, ThinkAnswerFormat

BUILTIN_REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "vader": VaderSentiment,
    "length": LengthTarget,
    "json_valid": JsonValid,
    "numeric_match": NumericAnswerMatch,
    "regex": RegexMatch,
    "iou": BoxIoU,
    "choice_accuracy": ChoiceAccuracy,
    "think_format": ThinkAnswerFormat,
}


def _builtin(spec: str, kwargs: dict[str, Any]) -> RewardFunction | None:
    """The built-in reward named by `spec`, or None when `spec` is not a built-in name."""
    name, sep, argument = spec.partition(":")
    if name not in BUILTIN_REWARDS or (sep and name not in ("regex", "length")):
        return None
    if name == "regex":
        if not sep or not argument:
            raise ValueError(
                f"reward spec {spec!r}: write the pattern after the colon, regex:PATTERN"
            )
        return RegexMatch(argument, **kwargs)
    if name == "length":
        if sep:
            try:
                kwargs = {**kwargs, "target": int(argument)}
            except ValueError as err:
                raise ValueError(
                    f"reward spec {spec!r}: length target must be an integer, e.g. length:50"
                ) from err
        if "target" not in kwargs:
            raise ValueError(f"reward spec {spec!r}: give a target, e.g. 'length:50'")
    try:
        return BUILTIN_REWARDS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"reward spec {spec!r}: bad arguments {kwargs}: {err}") from err


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _load_file(path_text: str, spec: str, what: str = "reward spec") -> Any:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} {spec!r}: file {str(path)!r} does not exist")
    module_name = f"_alignkit_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{what} {spec!r}: cannot load {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses/pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise ValueError(
            f"{what} {spec!r}: importing {str(path)!r} failed: {type(err).__name__}: {err}"
        ) from err
    return module


def _load_module(module_name: str, spec: str, what: str = "reward spec") -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"{what} {spec!r}: module {module_name!r} not found ({err}); use "
            f"'package.module:function' or 'path/to/file.py:function'"
        ) from err
    except Exception as err:
        raise ValueError(
            f"{what} {spec!r}: importing {module_name!r} failed: {type(err).__name__}: {err}"
        ) from err


def load_objects(spec: str, *, what: str) -> list[Any]:
    """The attributes named by `module:a,b` or `path/to/file.py:a,b` (one or more, in order);
    errors name `what` (the flag) and the spec. Used for --env and --tools."""
    target, sep, names = spec.strip().rpartition(":")
    attributes = [name.strip() for name in names.split(",") if name.strip()]
    if not sep or not target or not attributes:
        raise ValueError(f"{what} {spec!r}: expected 'package.module:name' or 'path/to/file.py:name'")
    module = _load_file(target, spec, what) if _is_file_spec(target) else _load_module(target, spec, what)
    missing = [name for name in attributes if not hasattr(module, name)]
    if missing:
        raise ValueError(f"{what} {spec!r}: {target!r} has no attribute {missing[0]!r}")
    return [getattr(module, name) for name in attributes]


def load_object(spec: str, *, what: str) -> Any:
    """The one attribute named by `module:name` or `file.py:name` (see `load_objects`)."""
    objects = load_objects(spec, what=what)
    if len(objects) != 1:
        raise ValueError(f"{what} {spec!r}: name one attribute, got {len(objects)}")
    return objects[0]


def _tensor_returning(fn: Callable[..., Any], spec: str) -> RewardFunction:
    """Wrap a plain reward function so its output is always a float32 tensor (B,) / (B, K).

    The wrapper is called like any reward, `(prompts, completions, **columns)`, and calls `fn`
    the way it wants (`invoke_reward`: TRL's keyword style or positionally). It carries `spec`
    as its name in error messages, and `score_safely` unwraps it to see `fn`'s own output."""

    @functools.wraps(fn)
    def reward(prompts: list[str], completions: list[str], **columns: Any) -> Tensor:
        values = invoke_reward(fn, prompts, completions, columns)
        try:
            return as_reward_tensor(values, len(completions))
        except RewardOutputError as err:
            raise err.named(spec) from None

    reward.alignkit_reward_name = spec  # type: ignore[attr-defined]
    reward.alignkit_converts = True  # type: ignore[attr-defined]
    return reward


# options a saved reward model takes in its spec: rm:DIR,principles=FILE,user_context=FILE
SAVED_MODEL_OPTIONS = {"principles": "FILE", "user_context": "FILE", "fusion_index": "FILE", "fusion_k": "K",
                       "fusion_min_sim": "S"}
"""The `rm:DIR,key=VALUE` options, with the placeholder error messages show for each."""


def saved_model_options(text: str, spec: str) -> tuple[str, dict[str, str]]:
    """(directory, options) of `DIR[,key=VALUE...]`: `principles=FILE` for an rm_principles
    model, `user_context=FILE` for an rm_vpl model, `fusion_index=FILE` (+ `fusion_k`,
    `fusion_min_sim`) for RewardFusion around any model (an existing directory whose name has
    a comma is taken whole)."""
    if "," not in text or os.path.isdir(text):
        return text, {}
    directory, *parts = text.split(",")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in SAVED_MODEL_OPTIONS or not value.strip():
            raise ValueError(f"reward spec {spec!r}: {part!r} is not one of "
                             + ", ".join(f"{k}={v}" for k, v in SAVED_MODEL_OPTIONS.items()))
        options[key.strip()] = value.strip()
    return directory, options


def load_reward(spec: str, **kwargs: Any) -> RewardFunction:
    """Load a reward function from `spec` (see the module docstring for the forms).

    `kwargs` go to a built-in reward's constructor or to a class named by the spec; giving
    them for a plain function is an error. Raises ValueError naming the spec when the module,
    file or attribute is missing or not callable.

    >>> load_reward("length:2")(["p"], ["a b c"]).item()
    -0.5
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty reward spec")
    if spec.startswith(("http://", "https://")):
        from alignkit.rewards.http_reward import HTTPReward

        return HTTPReward(spec, **kwargs)
    if spec.startswith("rm:") or os.path.isdir(spec):
        from alignkit.rewards.saved import load_reward_model

        directory, options = saved_model_options(spec[3:] if spec.startswith("rm:") else spec, spec)
        if not directory:
            raise ValueError(f"reward spec {spec!r}: write the reward-model directory after rm:")
        fusion = {key: options.pop(key) for key in list(options) if key.startswith("fusion_")}
        if not fusion:
            return load_reward_model(directory, **options, **kwargs)
        # rm:DIR,fusion_index=TRAIN.jsonl[,fusion_k=5,fusion_min_sim=0.9]: RewardFusion (checked first)
        from alignkit.rewards.fusion import fused_reward, parse_fusion_options

        fusion_options = parse_fusion_options(spec, ",".join(f"{k}={v}" for k, v in fusion.items()))
        return fused_reward(load_reward_model(directory, **options, **kwargs), fusion_options)
    if spec.startswith("judge:"):  # an LLM judge (alignkit.rewards.judge): judge:MODEL[,key=value...]
        from alignkit.rewards.judge import load_judge_reward

        return load_judge_reward(spec, **kwargs)
    builtin = _builtin(spec, kwargs)
    if builtin is not None:
        return builtin
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        raise ValueError(
            f"unknown reward spec {spec!r}: expected a built-in ({', '.join(BUILTIN_REWARDS)}), "
            f"'package.module:function' or 'path/to/file.py:function'"
        )
    module = _load_file(target, spec) if _is_file_spec(target) else _load_module(target, spec)
    try:
        obj = getattr(module, attribute)
    except AttributeError as err:
        raise ValueError(
            f"reward spec {spec!r}: {target!r} has no attribute {attribute!r}"
        ) from err
    if isinstance(obj, type):
        try:
            obj = obj(**kwargs)
        except TypeError as err:
            raise ValueError(f"reward spec {spec!r}: cannot construct {attribute}: {err}") from err
        kwargs = {}
    if not callable(obj):
        raise ValueError(
            f"reward spec {spec!r}: {attribute!r} is a {type(obj).__name__}, not a callable"
        )
    if kwargs:
        raise ValueError(f"reward spec {spec!r}: arguments {sorted(kwargs)} given to a function")
    return _tensor_returning(obj, spec)
