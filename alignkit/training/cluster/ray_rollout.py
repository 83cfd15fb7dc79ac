"""The rollout role of `--placement split:P,R` as the policy ranks see it: R rollout workers
(Ray actors, `workers.RolloutWorker`), each holding its own copy of the policy.

- `generate`: the prompts are split into R contiguous blocks of whole prompt groups, worker k
  samples block k with `first_sample` = the block's first global row (the engine keys its noise
  on the global sample index, so the tokens are the ones one process draws), and the blocks are
  concatenated in order. Under P > 1 ranks each rank sends its own block (`ShardedRollout`
  around this), split again over the R workers.
- `update_weights(source, version)`: rank 0 puts the full weights (LoRA merged, HF names) in
  Ray's object store once and every worker copies them in (the in-memory transport); the other
  ranks walk the iterator (under FSDP2 gathering is a collective). Each worker answers with its
  version, which must be `version`.
- A worker that died is an `EngineError` naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.rollout import Rollout, SamplingParams
from alignkit.rollout.http_engine import EngineError
from alignkit.training.online.distributed_rollout import prompt_block
from alignkit.training.run import distributed

_workers: list[Any] = []
"""The rollout workers' actor handles, set in a policy worker before the run starts."""


def set_rollout_workers(handles: Sequence[Any]) -> None:
    _workers[:] = list(handles)


def rollout_workers() -> list[Any]:
    if not _workers:
        raise ValueError("--placement split:P,R: no rollout workers in this process; "
                         "start the run with `alignkit train ... --placement split:P,R`")
    return list(_workers)


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """The rollouts of consecutive prompt blocks as one: rows in order, responses right-padded
    with `pad_id` to the widest, group indices offset by the prompts before each block."""
    if len(parts) == 1:
        return parts[0]
    width = max(part.response_ids.shape[1] for part in parts)

    def padded(tensor: Tensor, value) -> Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    offsets, groups = [], 0
    for part in parts:
        offsets.append(groups)
        groups += int(part.group_index.max()) + 1 if len(part) else 0
    extras = {"generated_tokens": sum(int(p.extras.get("generated_tokens", 0)) for p in parts),
              "decoded_rows": sum(int(p.extras.get("decoded_rows", 0)) for p in parts),
              "seconds": max(float(p.extras.get("seconds", 0.0)) for p in parts),
              "seed": parts[0].extras.get("seed")}
    return Rollout(
        prompt_ids=[prompt for part in parts for prompt in part.prompt_ids],
        response_ids=torch.cat([padded(p.response_ids, pad_id) for p in parts]),
        response_logprobs=torch.cat([padded(p.response_logprobs, 0.0) for p in parts]),
        response_mask=torch.cat([padded(p.response_mask, False) for p in parts]),
        finish_reason=[reason for part in parts for reason in part.finish_reason],
        group_index=torch.cat([p.group_index + offset for p, offset in zip(parts, offsets, strict=True)]),
        extras=extras,
    )


class RayRollout:
    """R rollout workers behind the `RolloutEngine` calls of the driver (module docstring)."""

    shares_policy = False
    exact_logprobs = False  # another process's kernels: the trainer recomputes and logs the diff
    merged_weights = True

    def __init__(self, workers: Sequence[Any], pad_id: int) -> None:
        import ray

        self.ray, self.workers, self.pad_id, self.version = ray, list(workers), int(pad_id), 0

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        calls = []
        for k in range(len(self.workers)):
            block = prompt_block(len(prompt_ids), k, len(self.workers))
            if len(block):
                shifted = dataclasses.replace(sampling, first_sample=sampling.first_sample + block.start * n)
                calls.append((k, self.workers[k].generate.remote([prompt_ids[i] for i in block], n, shifted)))
        return concat_rollouts([self._get(k, ref) for k, ref in calls], self.pad_id)

    def update_weights(self, source: Iterable[tuple[str, Tensor]] | None, version: int) -> None:
        if distributed.current().is_main:
            state = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in source or ()}
            shared = self.ray.put(state)
            del state
            calls = [(k, worker.update_weights.remote(shared, version)) for k, worker in enumerate(self.workers)]
            for k, ref in calls:
                reported = self._get(k, ref)
                if reported != version:
                    raise EngineError(f"rollout worker {k} reports weight version {reported} after the sync "
                                      f"of step {version}")
        else:
            for _ in source or ():  # take part in gathering the full weights
                pass
        distributed.barrier()
        self.version = version

    def _get(self, k: int, ref):
        """`ray.get(ref)` of worker k; its death an EngineError naming it, its error re-raised."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayActorError as error:
            raise EngineError(f"rollout worker {k} died ({type(error).__name__}); "
                              "--resume continues from the last checkpoint") from None
        except RayTaskError as error:
            raise error.as_instanceof_cause() from None

    def close(self) -> None:
        """The driver process stops the workers when the run ends."""
