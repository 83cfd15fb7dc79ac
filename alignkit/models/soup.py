"""Weight-space averages of checkpoints of one architecture ("model soups", Wortsman et al.
2022): SALSA's reference (Chakraborty et al. 2024, "SALSA: Soup-based Alignment Learning for
Stronger Adaptation in RLHF") is the soup of two or more SFT models fine-tuned from one base:

    theta_soup = sum_k w_k theta_k,   w_k >= 0,  sum_k w_k = 1   (uniform: w_k = 1 / K)

Floating-point tensors are averaged in float32 and cast back to the first checkpoint's dtype;
other tensors (integer buffers) must be equal across checkpoints. The checkpoints must have
the same parameter names and shapes (an error names the first mismatch). Weights are read
through `load_model` only (safetensors, never pickle), one checkpoint at a time besides the
running sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.models.loading import load_model


def parse_soup_weights(text: str | None, count: int, setting: str = "soup_weights") -> list[float]:
    """`"0.5,0.5"` -> [0.5, 0.5]: one non-negative weight per checkpoint, summing to 1 (within
    1e-6); None -> uniform 1 / count. A one-line ValueError naming `setting` otherwise."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{setting}={text!r}: comma-separated numbers, one per checkpoint") from None
    if len(weights) != count:
        raise ValueError(f"{setting}={text!r} has {len(weights)} weight(s) for {count} checkpoints: give one each")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"{setting}={text!r}: each weight must be a finite number >= 0")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"{setting}={text!r} sums to {sum(weights):g}: the weights must sum to 1")
    return weights


def check_same_parameters(first: Mapping[str, Tensor], other: Mapping[str, Tensor], first_name: str,
                          other_name: str) -> None:
    """Same tensor names in the same order and the same shapes; else a ValueError naming the
    first mismatch."""
    missing = [name for name in first if name not in other]
    extra = [name for name in other if name not in first]
    if missing or extra:
        what = f"{missing[0]!r} is missing" if missing else f"{extra[0]!r} is extra"
        raise ValueError(f"soup: {other_name} does not have the parameters of {first_name}: {what}")
    for name, tensor in first.items():
        if tuple(other[name].shape) != tuple(tensor.shape):
            raise ValueError(f"soup: {name} is {tuple(tensor.shape)} in {first_name} but "
                             f"{tuple(other[name].shape)} in {other_name}")


def weight_soup(states: Iterable[tuple[str, Mapping[str, Tensor]]], weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_k w_k theta_k of the (name, state dict) pairs `states`, consumed one at a time (a
    generator may load each checkpoint on demand); float tensors in float32, cast back to the
    first's dtype, others checked equal. Returns a new state dict."""
    total: dict[str, Tensor] = {}
    first: Mapping[str, Tensor] | None = None
    first_name = ""
    count = 0
    for (name, state), weight in zip(states, weights, strict=True):
        count += 1
        if first is None:
            first, first_name = dict(state), name
            total = {k: weight * v.float() if v.is_floating_point() else v.clone() for k, v in state.items()}
            continue
        check_same_parameters(first, state, first_name, name)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                total[key] += weight * tensor.float().to(total[key].device)
            elif not torch.equal(tensor.to(total[key].device), total[key]):
                raise ValueError(f"soup: the non-float tensor {key} differs between {first_name} and {name}")
    if count < 2:
        raise ValueError(f"soup: needs two or more checkpoints, got {count}")
    return {k: v.to(first[k].dtype) if first[k].is_floating_point() else v for k, v in total.items()}


def load_soup(directories: Sequence[str], weights: Sequence[float], *, dtype: Any = None, device: Any = None,
              tokenizer: Any = None) -> nn.Module:
    """The causal LM of `directories[0]` holding the soup of every directory's weights. With a
    `tokenizer` (the policy's), each checkpoint's vocabulary must equal it."""
    model, first_tokenizer = load_model(directories[0], dtype=dtype, device=device)
    _check_vocabulary(tokenizer, first_tokenizer, directories[0])

    def states():
        yield directories[0], model.state_dict()
        for directory in directories[1:]:
            other, other_tokenizer = load_model(directory, dtype=dtype, device=device)
            _check_vocabulary(tokenizer, other_tokenizer, directory)
            yield directory, other.state_dict()

    soup = weight_soup(states(), weights)
    model.load_state_dict(soup)
    return model


def _check_vocabulary(expected: Any, tokenizer: Any, directory: str) -> None:
    if expected is not None and tokenizer.get_vocab() != expected.get_vocab():
        raise ValueError(f"soup: the tokenizer of {directory} differs from the policy's (--model)")
