"""SSF, Scale-and-Shift Features (Lian et al. 2022, arXiv 2210.08823; dongzelian/SSF): a frozen
backbone whose chosen linear layers have their outputs scaled and shifted per feature,

    y = γ ⊙ (W x + b) + β,    γ, β (out,) trainable, γ initialised to 1 and β to 0,

so a freshly wrapped model computes exactly what the base model does. (The official code draws
γ ~ N(1, 0.02) and β ~ N(0, 0.02); alignkit starts at the identity so the policy equals its
reference at step 1, as LoRA's B = 0 does.) Since the map is affine it folds into the layer:

    W' = diag(γ) W,    b' = γ ⊙ b + β    (b = 0 where the layer has no bias),

which `folded_state_dict` computes for `final/` and for a rollout engine's weights; the folded
model is a plain transformers model of the same class, with the config switches that give the
folded layers a bias (`attention_bias`, `mlp_bias`) turned on. A layer whose architecture has
no such switch (Qwen2's o_proj, every Mistral projection) cannot hold b': `all-linear` leaves
it out with a warning, naming it explicitly is an error.

γ and β are kept in float32 whatever the base's dtype: in bfloat16, 1 + 1e-4 rounds to 1.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from alignkit.models.blocks import transformer_blocks
from alignkit.models.heads import _HEAD_NAMES

log = logging.getLogger("alignkit")
ALL_LINEAR = "all-linear"
BIAS_FLAGS = ("attention_bias", "mlp_bias")
"""Config switches that give a transformers architecture's projections a bias (Llama, Qwen3, ...)."""


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (weight (out, in)) or transformers' Conv1D (GPT-2; weight (in, out))."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _transposed(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


class ScaleShift(nn.Module):
    """A linear layer with SSF on its output: forward(x) = γ ⊙ base(x) + β (see the module doc).

    `base` keeps its (frozen) weights under `base.`; γ is `ssf_scale` and β `ssf_shift`."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        out_features = base.weight.shape[1] if _transposed(base) else base.weight.shape[0]
        device = base.weight.device
        self.ssf_scale = nn.Parameter(torch.ones(out_features, device=device, dtype=torch.float32))
        self.ssf_shift = nn.Parameter(torch.zeros(out_features, device=device, dtype=torch.float32))

    @property
    def weight(self) -> Tensor:  # code that reads a projection's dtype or device (as peft's layers allow)
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return (y * self.ssf_scale + self.ssf_shift).to(y.dtype)


def fold_scale_shift(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                     transposed: bool = False) -> tuple[Tensor, Tensor]:
    """(W', b') = (diag(γ) W, γ ⊙ b + β), computed in float32 and returned in W's dtype.

    weight: (out, in), or (in, out) for a Conv1D (`transposed`); bias (out,) or None (taken as
    0); scale γ and shift β (out,). Then W' x + b' = γ ⊙ (W x + b) + β for every x."""
    w = weight.detach().float()
    gamma, beta = scale.detach().float().to(w.device), shift.detach().float().to(w.device)
    folded_w = w * gamma[None, :] if transposed else w * gamma[:, None]
    b = torch.zeros_like(gamma) if bias is None else bias.detach().float().to(w.device)
    return folded_w.to(weight.dtype), (gamma * b + beta).to(weight.dtype)


def has_ssf(model: nn.Module) -> bool:
    """Whether `model` carries SSF layers (`apply_ssf`)."""
    return any(isinstance(m, ScaleShift) for m in model.modules())


def _biased_modules(model: nn.Module, config) -> set[str]:
    """Names of the linear layers that have a bias in a model of `model`'s class built from
    `config` (on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        fresh = type(model)(config)
    return {name for name, m in fresh.named_modules() if is_linear(m) and getattr(m, "bias", None) is not None}


def folded_config(model: nn.Module, targets: list[str]):
    """A copy of `model.config` with the `BIAS_FLAGS` switches on that give `targets` (linear
    layers without a bias) one in the folded model, and the targets that still have none."""
    config = copy.deepcopy(model.config)
    needed = set(targets)
    if not needed:
        return config, []
    biased = _biased_modules(model, config)
    for flag in BIAS_FLAGS:
        if not (needed - biased):
            break
        if getattr(config, flag, None) is False:
            trial = copy.deepcopy(config)
            setattr(trial, flag, True)
            gained = _biased_modules(model, trial)
            if (needed - biased) & gained:
                config, biased = trial, gained
    return config, sorted(needed - biased)


def ssf_layers(model: nn.Module) -> list[tuple[str, ScaleShift]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ScaleShift)]


def _fold_target(model: nn.Module, layers: list[tuple[str, ScaleShift]]):
    """(config of the folded model, names of its linear layers with a bias), computed once per
    model (`apply_ssf` stores them: a rollout engine asks for folded weights every step)."""
    cached = getattr(model, "_ssf_fold_target", None)
    if cached is not None:
        return cached
    config, unfoldable = folded_config(model, [n for n, m in layers if m.base.bias is None])
    if unfoldable:
        raise ValueError(f"--adapter ssf: {type(model).__name__} has no bias on {unfoldable[0]} to fold the shift "
                         "into")
    model._ssf_fold_target = (config, _biased_modules(model, config))
    return model._ssf_fold_target


def folded_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], object]:
    """(state dict of the folded plain model, its config): every SSF layer's W', b'; the other
    tensors as they are (detached, not copied: do not modify them); zero biases for layers the
    folded config gives one that SSF did not target (e.g. `attention_bias` turns on o_proj's)."""
    layers = ssf_layers(model)
    config, biased = _fold_target(model, layers)
    layer_names = {name for name, _ in layers}
    state = {}
    for key, value in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in layer_names and leaf in ("ssf_scale", "ssf_shift"):
            continue
        if module_name.endswith(".base") and module_name[: -len(".base")] in layer_names:
            key = f"{module_name[: -len('.base')]}.{leaf}"  # `q_proj.base.weight` -> `q_proj.weight`
        state[key] = value.detach()
    for name, layer in layers:
        weight, bias = fold_scale_shift(layer.base.weight, layer.base.bias, layer.ssf_scale, layer.ssf_shift,
                                        transposed=_transposed(layer.base))
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
    for name in biased:
        key = f"{name}.bias"
        if key not in state and f"{name}.weight" in state:
            weight = state[f"{name}.weight"]
            out_features = weight.shape[1] if _transposed(model.get_submodule(name)) else weight.shape[0]
            state[key] = torch.zeros(out_features, dtype=weight.dtype, device=weight.device)
    return state, config


def ssf_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the linear layers `--ssf-target-modules` selects: all-linear = every linear
    layer inside the transformer blocks whose folded bias the architecture can hold (the others
    are logged and left out); otherwise each listed name matches the layers whose name is it
    or ends with `.name`, and every one must match and be foldable."""
    linear = [name for name, m in model.named_modules() if is_linear(m)]
    if target_modules == ALL_LINEAR:
        blocks = [name for name, _ in transformer_blocks(model)]
        if not blocks:
            raise ValueError(f"--adapter ssf: found no transformer blocks in {type(model).__name__} for all-linear; "
                             "name the layers with --ssf-target-modules")
        chosen = [n for n in linear if any(n.startswith(f"{b}.") for b in blocks)]
    else:
        names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        chosen = []
        for target in names:
            matched = [n for n in linear if n == target or n.endswith(f".{target}")]
            if not matched:
                raise ValueError(f"--ssf-target-modules: no linear layer of {type(model).__name__} is named {target!r}")
            chosen += [n for n in matched if n not in chosen]
    unbiased = [n for n in chosen if getattr(model.get_submodule(n), "bias", None) is None]
    _, unfoldable = folded_config(model, unbiased)
    if unfoldable and target_modules != ALL_LINEAR:
        raise ValueError(f"--ssf-target-modules: {type(model).__name__} cannot hold a bias on {unfoldable[0]}, so its "
                         "shift would not fold into final/; leave it out")
    if unfoldable:
        log.warning("--adapter ssf: %d linear layer(s) left out, their architecture holds no bias for the folded "
                    "shift (%s, ...)", len(unfoldable), unfoldable[0])
    chosen = [n for n in chosen if n not in unfoldable]
    if not chosen:
        raise ValueError(f"--adapter ssf: no linear layer of {type(model).__name__} can take SSF with a foldable shift")
    return chosen


def apply_ssf(model: nn.Module, *, target_modules: str | list[str] = ALL_LINEAR, task: str = "causal_lm") -> nn.Module:
    """Freeze `model` and wrap the `ssf_targets` in `ScaleShift` layers, in place; returns it.

    task "reward" keeps the score head trainable (it starts random), as `apply_lora` does.
    Only γ, β (and that head) require grad afterwards."""
    from alignkit.models.adapters import LORA_TASKS, is_peft

    if task not in LORA_TASKS:
        raise ValueError(f"task must be one of {LORA_TASKS}, got {task!r}")
    if is_peft(model):
        raise ValueError("--adapter ssf: the model already has peft adapters; SSF expects a plain model")
    if has_ssf(model):
        raise ValueError("--adapter ssf: the model already has SSF layers")
    targets = ssf_targets(model, target_modules)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ScaleShift(getattr(parent, child)))
    _fold_target(model, ssf_layers(model))
    if task == "reward":
        for head in _HEAD_NAMES:
            if hasattr(model, head):
                getattr(model, head).requires_grad_(True)
    return model
