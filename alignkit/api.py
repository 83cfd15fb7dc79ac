"""`alignkit.train(...)`: the Python face of `alignkit train`; the CLI is a thin layer over it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from alignkit.training.offline.loop import run_offline
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.result import TrainResult


def train(
    algorithm: str,
    *,
    model: Any = "smollm2-135m",
    data: Any = None,
    output_dir: str | Path = "runs/alignkit",
    tokenizer: Any = None,
    eval_data: Any = None,
    reward: Any = None,
    config: TrainConfig | None = None,
    callbacks: tuple = (),
    **overrides: Any,
) -> TrainResult:
    """Train `algorithm` exactly as `alignkit train ALGO` does; return the `final/` path and metrics.

    `model`: a local directory, hub id, `smollm2-135m`, or a loaded `PreTrainedModel` (pass its
    `tokenizer` too). `data` / `eval_data`: a path, hub id, `datasets.Dataset` or a list of
    dicts. `overrides`: any `TrainConfig` field (`batch_size=4`, `lora_r=8`) or an algorithm
    hyper-parameter (`beta=0.1`). `reward` (online algorithms and A-LoL): a callable
    `(prompts, completions, **columns) -> Tensor (B,) | list[float]` or a spec string
    (`module:function`, `file.py:function`, a built-in); `reward_model=DIR` uses a reward model.
    Online validation: `eval_data` (held-out prompts), `eval_steps=N` and `gold_reward` (a
    callable or spec, like `reward`).
    """
    config = config or TrainConfig()
    config.algorithm = algorithm
    config.output = str(output_dir)
    loaded_model = None
    if isinstance(model, str | Path):
        config.model = str(model)
    else:
        loaded_model = model
        config.model = getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory model>"
    if isinstance(data, str | Path):
        config.data = str(data)
        data = None
    elif data is not None:
        config.data = "<in-memory data>"
    if isinstance(eval_data, str | Path):
        config.eval_data = str(eval_data)
        eval_data = None
    gold_reward = overrides.pop("gold_reward", None)
    if isinstance(overrides.get("eval_k"), int | list | tuple):  # eval_k=4 or [1, 4]: --eval-k's text
        ks = overrides["eval_k"]
        overrides["eval_k"] = ",".join(str(k) for k in (ks if isinstance(ks, list | tuple) else [ks]))
    if isinstance(gold_reward, str | Path):
        config.gold_reward, gold_reward = str(gold_reward), None
    config.apply_overrides(overrides)
    from alignkit.cli_train import explicit_fields
    from alignkit.training.run.registry import ALGORITHMS
    from alignkit.training.run.validate import check_ignored, validate_values

    online = algorithm in ALGORITHMS and ALGORITHMS[algorithm].runner == "online"
    if online and eval_data is not None:  # validation checks that there are held-out prompts
        config.eval_data = "<in-memory data>"
    if isinstance(reward, str | Path):
        config.reward, reward = str(reward), None
    elif isinstance(reward, list | tuple) and reward and all(isinstance(r, str | Path) for r in reward):
        config.reward, reward = [str(r) for r in reward], None
    elif reward is not None and not online:  # A-LoL scores the reference's own samples with it
        config.reward = reward
    spec, task = validate_values(config)
    given = explicit_fields(config, TrainConfig()) & set(overrides)
    # an option the algorithm ignores is an error, as on the CLI (in-memory eval data counts as eval data)
    check_ignored(dataclasses.replace(config, eval_data=config.eval_data or ("<in-memory data>" if eval_data is not None
                                                                            else None)), spec, task, given)
    if config.placement != "local":
        if (loaded_model is not None or data is not None or eval_data is not None or gold_reward is not None
                or (reward is not None and online)):
            raise ValueError(f"placement={config.placement!r}: the Ray workers load the model, data and reward "
                             "themselves; pass them as paths or specs, not Python objects")
        from alignkit.training.cluster.launch import run_placed

        return run_placed(config)
    if online:
        from alignkit.training.online.loop import run_online

        return run_online(
            config, model=loaded_model, tokenizer=tokenizer, data=data, reward=reward, callbacks=callbacks,
            eval_data=eval_data, gold_reward=gold_reward,
        )
    if gold_reward is not None:
        raise ValueError(f"gold_reward applies to online validation; {algorithm} trains offline")
    return run_offline(
        config, model=loaded_model, tokenizer=tokenizer, data=data, eval_data=eval_data, callbacks=callbacks
    )
