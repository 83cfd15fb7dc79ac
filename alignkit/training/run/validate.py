"""Checking a run's configuration before anything is loaded: `validate_config(config, given)`.

Everything that can be wrong without reading the data or a model's weights fails here, in
well under a second, as one ValueError / FileNotFoundError naming the flag or key:

- choice options (`--scheduler`, `--device`, ...) list their allowed values;
- numeric ranges of the fields (`ranges.FIELD_RANGES`) and of the algorithm's
  hyper-parameters where its paper fixes them (`ranges.HPARAM_RANGES`);
- `--eval-holdout`: a fraction in (0, 1) or a whole count (4.0 becomes the count 4);
- online validation: --eval-data and --eval-steps together, --eval-k within --eval-samples;
- `--device cuda` needs CUDA, `--tensorboard` the tensorboard package;
- the algorithm's task is built (unknown or mistyped hyper-parameters fail there);
- --adapter, --lora-r, --ssf-target-modules and hft fit together (`adapters.py`);
- an option the algorithm ignores, given explicitly, is an error (`ignored_fields`);
- model sources (`--model`, `--ref-model`, `--reward-model`, reward models named in
  hyper-parameters) are checked on disk (`alignkit.models.loading.check_model_source`).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
from pathlib import Path
from typing import Any

from alignkit.data.hh import DATA_FORMATS
from alignkit.rollout.http_engine import LOGPROBS_MODES
from alignkit.training.run.adapters import ADAPTERS, check_training_methods
from alignkit.training.run.config import TrainConfig, field_types
from alignkit.training.run.distributed import STRATEGIES
from alignkit.training.run.ranges import check_field_ranges, check_hparam_ranges, hparam_ranges

CHOICES: dict[str, tuple[str, ...]] = {
    "nonfinite": ("skip", "stop"),
    "scheduler": ("cosine", "linear", "constant"),
    "strategy": STRATEGIES,
    "dtype": ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda", "cuda:N", "mps"),
    "data_format": DATA_FORMATS,
    "rollout": ("hf", "vllm"),
    "vllm_logprobs_mode": LOGPROBS_MODES,
    "vllm_lora_sync": ("merged", "adapter"),
    "adapter": ADAPTERS,
}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

LORA_OPTIONS = ("lora_alpha", "lora_dropout", "lora_target_modules")
ONLINE_IGNORES = {
    "grad_accum": "a step is --batch-size prompts; split it with --set minibatches / micro_batch_size",
    "max_length": "generation is bounded by --set max_new_tokens (and --max-prompt-length)",
    "eval_holdout": "online runs validate on held-out prompts given as --eval-data",
    "allow_identical_pairs": "online runs read prompts only",
}
OWN_LOOP_IGNORES = {
    "grad_accum": "its heads train in a loop of their own, one batch per step",
    "lora_r": "its backbone is frozen (only heads train)",
    "adapter": "its backbone is frozen (only heads train)",
    "gradient_checkpointing": "its backbone is frozen (only heads train)",
    "eval_holdout": "it evaluates --eval-data only",
    "eval_steps": "it evaluates --eval-data once, at the end",
}
REWARD_FIELDS = ("reward", "reward_weights", "reward_model", "reward_timeout", "reward_workers")
ONLINE_EVAL_FIELDS = ("gold_reward", "eval_samples", "eval_k", "eval_pass_threshold")
ROLLOUT_FIELDS = ("rollout", "vllm_url", "vllm_python", "vllm_args", "vllm_logprobs_mode", "vllm_lora_sync")
VLLM_FIELDS = ROLLOUT_FIELDS[1:]


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def check_choices(config: TrainConfig) -> None:
    """Each choice option holds one of its allowed values (the message lists them)."""
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        valid = bool(_DEVICE.match(str(value))) if name == "device" else value in allowed
        if not valid:
            raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, got {value!r}")


def holdout_value(value: Any) -> int | float:
    """--eval-holdout as `RowTable.split` takes it: 0 (none), a fraction in (0, 1), or a whole
    count >= 1 (4.0 -> 4). Anything else is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"--eval-holdout must be a number, got {value!r}")
    if value == 0:
        return 0.0
    if 0 < value < 1:
        return float(value)
    if value >= 1 and float(value).is_integer():
        return int(value)
    raise ValueError(f"--eval-holdout must be a fraction in (0, 1) or a whole number of rows >= 1, "
                     f"got {value!r}")


def split_holdout(table: Any, holdout: Any, seed: int) -> tuple[Any, Any]:
    """(train, eval) rows of `table` for --eval-holdout (a fraction, or a count: 4.0 holds out
    4 rows); an impossible split is a ValueError naming the flag."""
    value = holdout_value(holdout)
    try:
        return table.split(value, seed=seed)
    except ValueError as error:
        raise ValueError(f"--eval-holdout {value!r}: {error}") from None


def check_device(device: str) -> None:
    """A CUDA (or MPS) device asked for must exist."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here "
                             "(torch.cuda.is_available() is False); use --device cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("--device mps: MPS is not available here; use --device cpu or auto")


def tensorboard_installed() -> bool:
    """Whether `import tensorboard` can work (torch.utils.tensorboard needs the package)."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a module entry of None, or a broken one
        return False


def uses_reference(task: Any) -> bool:
    """Whether an offline task reads --ref-model: it caches reference log-probs, or keeps a
    live reference (TR-DPO's ref_sync)."""
    live = getattr(getattr(task, "options", None), "ref_sync", "off") != "off"
    return bool(getattr(task, "needs_reference", False)) or live


def online_ignores(config: TrainConfig, settings: Any) -> dict[str, str]:
    """Fields an online preset ignores with these settings."""
    from alignkit.training.online.presets import needs_reference

    ignored = dict(ONLINE_IGNORES)
    starts_from_soup = settings.soup and settings.policy_init == "soup"  # salsa: --ref-model is the init
    if not needs_reference(settings) and not starts_from_soup:
        ignored["ref_model"] = (f"with beta={settings.beta} and kl_in={settings.kl_in!r} no reference "
                                "model is loaded")
    elif config.lora_r > 0 and not settings.soup:
        ignored["ref_model"] = "with LoRA the reference is the base model with the adapter off"
    if not (config.reward or config.gold_reward):
        ignored.update({name: "it applies to a reward function (--reward), not to --reward-model"
                        for name in ("reward_timeout", "reward_workers")})
    if config.placement == "local":
        ignored["ray_address"] = "it applies to --placement colocate or split"
    if config.rollout != "vllm":
        ignored.update({name: "it applies to --rollout vllm" for name in VLLM_FIELDS})
    elif config.vllm_url:
        ignored.update({name: "--vllm-url names a running server; alignkit starts none"
                        for name in ("vllm_python", "vllm_args")})
    if config.rollout == "vllm" and not (config.lora_r > 0 and config.adapter in ("auto", "lora")):
        ignored["vllm_lora_sync"] = "it chooses how a LoRA policy is sent (--lora-r > 0); this one sends every weight"
    return ignored


def offline_ignores(config: TrainConfig, task: Any) -> dict[str, str]:
    """Fields an offline algorithm's task ignores."""
    takes_reward = hasattr(task, "value_options")  # A-LoL scores the reference's samples
    ignored = {name: "it takes no reward function or reward model (the data carries the signal)"
               for name in REWARD_FIELDS if not (takes_reward and name != "reward_model")}
    if takes_reward:
        ignored["reward_model"] = "it scores samples with a reward function: --reward module:function"
    if not uses_reference(task) or hasattr(task, "run"):
        ignored["ref_model"] = "it uses no reference model"
    if hasattr(task, "run") and not getattr(task, "data_parallel", False):
        ignored.update(OWN_LOOP_IGNORES)
        ignored.update({name: OWN_LOOP_IGNORES["lora_r"] for name in LORA_OPTIONS + ("ssf_target_modules",)})
    ignored.update({name: "offline algorithms sample nothing" for name in ROLLOUT_FIELDS + ONLINE_EVAL_FIELDS})
    if config.placement == "local":
        ignored["ray_address"] = "it applies to --placement colocate"
    if config.algorithm == "rm_embedding":
        ignored["model"] = "its encoder is all-MiniLM-L6-v2; use --set encoder_dir=DIR for another one"
    return ignored


def ignored_fields(config: TrainConfig, spec: Any, task: Any) -> dict[str, str]:
    """TrainConfig field -> why `config.algorithm` ignores it, for these settings."""
    if hasattr(task, "ignored_fields"):  # a task with its own loop says what it ignores (d3po, prdp)
        ignored = task.ignored_fields(config)
    else:
        ignored = online_ignores(config, task) if spec.runner == "online" else offline_ignores(config, task)
    if config.lora_r == 0:
        ignored.update({name: "LoRA options need --lora-r > 0" for name in LORA_OPTIONS})
    if not (config.eval_data or config.eval_holdout):
        ignored.setdefault("eval_steps", "there is no evaluation data: add --eval-data or --eval-holdout")
    return ignored


def check_ignored(config: TrainConfig, spec: Any, task: Any, given: set[str]) -> None:
    """An option given explicitly that the algorithm ignores is an error, not a no-op."""
    if {"reward", "reward_model"} <= given and config.reward and config.reward_model:
        raise ValueError("--reward and --reward-model both name the reward; give one of them")
    ignored = ignored_fields(config, spec, task)
    for name in sorted(given & set(ignored)):
        raise ValueError(f"{flag(name)} is ignored by {config.algorithm}: {ignored[name]}")


def model_sources(config: TrainConfig, spec: Any, task: Any) -> list[tuple[str, str]]:
    """(flag, source) of every model the run will load, besides the data."""
    own_model = config.algorithm == "rm_embedding" or getattr(task, "model_kind", "") == "diffusion"
    sources = [] if own_model else [("--model", config.model)]  # a diffusers pipeline: its task checks it
    if config.ref_model and spec.runner == "online" and not config.ref_model.startswith("merge:"):
        # several, comma-separated: salsa's soup (a merge: spec is one source, checked whole)
        sources += [("--ref-model", part.strip()) for part in config.ref_model.split(",") if part.strip()]
    elif config.ref_model:
        sources.append(("--ref-model", config.ref_model))
    if config.reward_model and spec.runner == "online":
        sources.append(("--reward-model", config.reward_model))
    if getattr(task, "critic_init", None):
        sources.append(("--set critic_init", task.critic_init))
    for directory in getattr(getattr(task, "options", None), "margin_reward_models", None) or []:
        sources.append(("--set margin_reward_models", str(directory)))
    return sources


def check_model_sources(config: TrainConfig, spec: Any, task: Any) -> None:
    from alignkit.models.loading import check_model_source

    for name, source in model_sources(config, spec, task):
        if name == "--ref-model" and source.startswith("merge:"):
            from alignkit.merge.spec import check_model_spec

            check_model_spec(source, name)
            continue
        check_model_source(source, name)


def check_field_types(config: TrainConfig) -> None:
    """Every field holds a value of its annotated type (values set in Python bypass tyro)."""
    from alignkit.training.run.config import coerce_override

    for name, annotation in field_types().items():
        setattr(config, name, coerce_override(name, getattr(config, name), annotation))


def validate_config(config: TrainConfig, given: set[str] = frozenset()) -> TrainConfig:
    """Check `config` before anything is loaded (see the module docstring); `given` names the
    fields the user set explicitly (an ignored one is an error). Normalises --eval-holdout."""
    spec, task = validate_values(config)
    check_device(config.device)
    if config.tensorboard and not tensorboard_installed():
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if spec.runner == "online" and not (config.reward or config.reward_model or config.env):  # --env: its rewards
        raise ValueError(f"{config.algorithm} needs a reward: --reward module:function (or a built-in "
                         "such as vader) or --reward-model DIR")
    check_ignored(config, spec, task, set(given))
    check_model_sources(config, spec, task)
    if spec.runner == "online" and config.rollout == "vllm" and not config.vllm_url:
        if not Path(config.vllm_python).exists():
            raise ValueError(f"--vllm-python {config.vllm_python}: no such interpreter; build vLLM's environment "
                             "with `make vllm`, or pass --vllm-url of a running server")
        try:
            shlex.split(config.vllm_args)
        except ValueError as error:
            raise ValueError(f"--vllm-args {config.vllm_args!r}: {error}") from None
    return config


def check_placement(config: TrainConfig, runner: str) -> None:
    """--placement parses; split is for online algorithms and starts its own rollout engines;
    Ray placement is not combined with torchrun (Ray starts the ranks itself)."""
    from alignkit.training.cluster.placement import parse_placement
    from alignkit.training.run.distributed import launched_by_torchrun

    placement = parse_placement(config.placement)
    if placement.split and runner != "online":
        raise ValueError(f"--placement {config.placement}: a rollout pool is for online algorithms; "
                         f"{config.algorithm} trains offline (use --placement colocate:N)")
    if placement.split and config.rollout == "vllm" and config.vllm_url:
        raise ValueError(f"--placement {config.placement} starts a vLLM server on each rollout worker: "
                         "drop --vllm-url (or use --placement local / colocate with it)")
    if placement.split and config.vllm_lora_sync == "adapter":
        raise ValueError(f"--placement {config.placement}: the rollout pool is sent merged weights; "
                         "--vllm-lora-sync adapter is for --placement local or colocate")
    if placement.on_ray and importlib.util.find_spec("ray") is None:
        raise ValueError(f"--placement {config.placement} needs Ray: pip install 'alignkit[ray]'")
    if placement.on_ray and launched_by_torchrun() and not os.environ.get("ALIGNKIT_RAY_WORKER"):
        raise ValueError(f"--placement {config.placement} starts its workers on Ray: run it without torchrun")


def validate_values(config: TrainConfig):
    """The checks that need no files: the algorithm exists, every field has its type, a known
    choice and a value in range, and so does every hyper-parameter. Returns (spec, task);
    `alignkit.train()` runs these (its models, data and rewards may be Python objects)."""
    from alignkit.training.run.registry import ALGORITHMS

    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {config.algorithm!r}; `alignkit algorithms` lists them")
    spec = ALGORITHMS[config.algorithm]
    check_field_types(config)
    check_choices(config)
    check_field_ranges({name: getattr(config, name) for name in field_types()})
    config.eval_holdout = holdout_value(config.eval_holdout)
    check_placement(config, spec.runner)
    if spec.runner == "online":
        from alignkit.training.online.validation import check_eval_options

        check_eval_options(config)
    task = spec.make_task(copy.deepcopy(config))
    check_training_methods(config, task)
    components = sorted(getattr(task, "weights", None) or {})
    online_pairwise = spec.runner == "online" and getattr(task, "objective", "") == "pairwise"
    check_hparam_ranges(config.algorithm, config.hparams,
                        hparam_ranges(config.algorithm, spec.kind, components, online_pairwise))
    return spec, task
