"""The repeated transformer blocks of a model, by name: what SSF's `all-linear` targets and what
HFT halves (`alignkit.training.run.hft`)."""

from __future__ import annotations

from torch import nn


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) for every child of the model's longest `nn.ModuleList`, in order:
    `model.layers.0`, `model.layers.1`, ... for Llama; `transformer.h.0`, ... for GPT-2. The
    first such list when several are equally long; [] for a model without one."""
    best_name, best = "", None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > (len(best) if best is not None else 0):
            best_name, best = name, module
    if best is None:
        return []
    prefix = f"{best_name}." if best_name else ""
    return [(f"{prefix}{index}", block) for index, block in enumerate(best)]
