"""Wrapping a role's computation for DDP or FSDP2, and full tensors behind FSDP2 shards.

`TaskForward(model, compute)` is the one module a data-parallel engine wraps: its `forward`
runs `compute(model, ...)` (a task's loss, a role's log-probs), so DDP's gradient all-reduce and
FSDP2's unsharding hooks fire; `guard_model` makes a forward that bypasses it raise. `wrap`
applies DDP, or `fully_shard` per decoder block and then the root on an explicit mesh. See
`distributed.py` for the ranks, collectives and the rules that keep W ranks equal to one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from alignkit.training.run.distributed import Ranks, current

# --------------------------------------------------------------------------- wrapping


class _GuardState:
    def __init__(self) -> None:
        self.depth = 0


class TaskForward(nn.Module):
    """The one module a data-parallel engine wraps: `forward(batch)` runs
    `compute(model, batch)` (a task's loss, a role's log-probs) on the model it owns."""

    def __init__(self, model: nn.Module, compute) -> None:
        super().__init__()
        self.model = model
        self._compute = compute
        self._guard = _GuardState()  # how deep inside forward we are (`guard_model` reads it)

    def forward(self, *args, **kwargs):
        self._guard.depth += 1
        try:
            return self._compute(self.model, *args, **kwargs)
        finally:
            self._guard.depth -= 1


class WrapperBypassed(RuntimeError):
    """A forward reached a data-parallel model without going through its wrapper."""


def guard_model(forward: TaskForward, strategy: str) -> None:
    """Make forwards that bypass the wrapper raise instead of training wrong.

    The hooks sit on the input embeddings (every `nn.Embedding` inside: policy and critic), which
    every forward path (full logits, decoder + fused head, score head) passes. Under DDP a
    gradient-enabled forward outside the wrapper would skip the all-reduce; under FSDP2 any
    forward outside it meets sharded root weights.
    """
    state = forward._guard

    def check(_module, _inputs):
        if state.depth > 0:
            return
        if strategy == "fsdp2" or torch.is_grad_enabled():
            raise WrapperBypassed(
                f"a forward reached the model outside its {strategy.upper()} wrapper: gradients would "
                "not be synchronised across ranks. Call the wrapped TaskForward, not the model inside it."
            )

    for module in forward.model.modules():
        if isinstance(module, nn.Embedding):
            module.register_forward_pre_hook(check)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks FSDP2 shards one by one: the children of the longest
    ModuleLists (a policy's layers, and a separate critic's copy of them)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    longest = max((len(m) for m in lists), default=0)
    return [block for m in lists if len(m) == longest for block in m]


def wrap(forward: TaskForward, ranks: Ranks, device: torch.device, unused_parameters: bool = False) -> nn.Module:
    """DDP or FSDP2 (`fully_shard` per decoder block, then the root, on an explicit mesh).

    `unused_parameters`: some trainable weights get no gradient in a forward (IFT feeds the
    decoder detached embeddings): DDP must then look for them, or it waits for them forever."""
    guard_model(forward, ranks.strategy)
    if ranks.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # buffers (rotary frequencies) are constants: no broadcast, so no-grad forwards of the
        # module inside need no collective and may differ in number across ranks
        import inspect

        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})  # the name before torch 2.13
        return DistributedDataParallel(forward, device_ids=device_ids, find_unused_parameters=unused_parameters,
                                       **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world,))
    for block in decoder_blocks(forward.model):
        fully_shard(block, mesh=mesh)
    fully_shard(forward, mesh=mesh)
    return forward


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last accumulated micro-batch."""
    if enabled or not current().distributed:
        yield
        return
    no_sync = getattr(wrapped, "no_sync", None)
    if no_sync is not None:  # DDP
        with no_sync():
            yield
        return
    setter = getattr(wrapped, "set_requires_gradient_sync", None)  # FSDP2
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


# --------------------------------------------------------------------------- full tensors


def full_tensor(value: Tensor) -> Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank must call it)."""
    to_full = getattr(value, "full_tensor", None)
    return to_full() if to_full is not None else value


def like_parameter(value: Tensor, param: Tensor) -> Tensor:
    """A full tensor laid out like `param`: its local shard when `param` is a DTensor."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return value.to(param.device, param.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.dtype), mesh, param.placements, src_data_rank=None)


def unshard_parameters(model: nn.Module) -> None:
    """Replace every DTensor parameter by a plain full one in place (ties kept), so the model
    saves and generates like an unwrapped one. A collective; used once, after training."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if getattr(param, "device_mesh", None) is None:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(param.full_tensor().detach().clone(),
                                                   requires_grad=param.requires_grad)
            setattr(module, name, replaced[id(param)])
