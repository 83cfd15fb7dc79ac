"""LoRA adapters through `peft`, and the "reference = base with adapter off" trick.

LoRA (Hu et al. 2021) replaces a frozen weight W (out x in) by

    W' = W + (alpha / r) * B A,    A (r x in), B (out x r), B initialised to 0,

so a freshly wrapped model computes exactly what the base model does, and the base model
is always one context manager away (`adapter_disabled`): offline and online methods use it as
the reference policy without a second copy of the weights.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from alignkit.models.heads import _HEAD_NAMES
from alignkit.models.vlm import is_vlm_config, language_lora_targets, module_role

LORA_TASKS = ("causal_lm", "reward")


def is_peft(model: nn.Module) -> bool:
    """True for a `peft.PeftModel` (anything carrying adapters through peft). Until peft is
    imported no object can be one, so plain runs do not pay for importing it."""
    peft_model = getattr(sys.modules.get("peft"), "PeftModel", None)
    return peft_model is not None and isinstance(model, peft_model)


def _is_sequence_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    task: str = "causal_lm",
    train_vlm_parts: tuple[str, ...] = (),
) -> nn.Module:
    """Wrap `model` with fresh LoRA adapters of rank `r`; returns a `peft.PeftModel`.

    alpha defaults to 2 r (scale alpha / r = 2). `target_modules="all-linear"` adapts every
    linear layer except the output layer. task "reward" keeps the score head fully trainable
    (`modules_to_save`), since a reward model's head starts random. Only adapter (and head)
    parameters require grad afterwards.

    On a vision-language model "all-linear" means the language model's linear layers only:
    the vision tower and projector stay frozen, unless `train_vlm_parts` names "projector"
    and/or "vision" (`alignkit.models.vlm.module_role`), whose weights then train in full.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if task not in LORA_TASKS:
        raise ValueError(f"task must be one of {LORA_TASKS}, got {task!r}")
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if is_peft(model):
        raise ValueError("model already has peft adapters; apply_lora expects a plain model")
    classifier = _is_sequence_classifier(model)
    if classifier != (task == "reward"):
        kind = "a sequence-classification" if classifier else "a causal-LM"
        raise ValueError(f"apply_lora(task={task!r}) got {kind} model {type(model).__name__}")

    vlm = is_vlm_config(getattr(model, "config", None))
    unknown = sorted(set(train_vlm_parts) - {"projector", "vision"})
    if unknown or (train_vlm_parts and not vlm):
        raise ValueError(
            f"train_vlm_parts takes 'projector' and/or 'vision' of a vision-language model; got "
            f"{list(train_vlm_parts)} for {type(model).__name__}"
        )
    if vlm and target_modules == "all-linear":
        target_modules = language_lora_targets(model)
    modules_to_save = None
    if task == "reward":
        modules_to_save = [name for name in _HEAD_NAMES if hasattr(model, name)]
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type=TaskType.SEQ_CLS if task == "reward" else TaskType.CAUSAL_LM,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    for name, parameter in peft_model.named_parameters():
        if module_role(name) in train_vlm_parts:
            parameter.requires_grad = True
    return peft_model


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes the base model (adapters and saved heads off).

    Raises ValueError for a model without peft adapters: there is no base to fall back to,
    and silently yielding the trained policy as its own reference would hide the bug.
    Callers check `is_peft(model)` and keep a separate reference model otherwise.
    """
    if not is_peft(model):
        raise ValueError(
            f"adapter_disabled needs a peft model, got {type(model).__name__}; "
            "check is_peft(model) and use a separate reference model otherwise"
        )
    with model.disable_adapter():
        yield model
