"""`--rollout vllm`: the rollout role played by a vLLM server over HTTP (`HTTPEngine`).

The server holds its own copy of the policy: after every update the trainer's weights (LoRA
merged, HF names) are written once and reloaded by the server, and the version it reports must
be the step. Its log-probs come from other kernels, so they are not exact: the loop recomputes
the old log-probs with the trainer and logs `rollout/logprob_diff_mean|max` (|engine - trainer|
per token) at temperature 1. Under torchrun every rank sends its own prompt groups to the one
server; rank 0 alone writes and reloads the weights (every rank still walks the weight
iterator: under FSDP2 gathering them is a collective).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from alignkit.rollout import Rollout, SamplingParams
from alignkit.rollout.http_engine import EngineError, HTTPEngine
from alignkit.training.run import distributed


def eos_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """The tokenizer's eos and the generation config's, as `HFRollout` stops on them."""
    found = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        found.add(generation_eos)
    elif generation_eos:
        found.update(generation_eos)
    return tuple(sorted(token for token in found if token is not None))


class ServerRollout:
    """A rollout engine in another process, reached by `HTTPEngine`."""

    shares_policy = False
    exact_logprobs = False
    merged_weights = True

    def __init__(self, engine: HTTPEngine, tokenizer: Any, model: Any) -> None:
        self.engine = engine
        self.pad_id = int(tokenizer.pad_token_id)
        self.stop_ids = eos_ids(tokenizer, model)
        self.version = 0

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        if not sampling.ignore_eos:
            sampling = dataclasses.replace(
                sampling, stop_token_ids=tuple(sorted(set(sampling.stop_token_ids) | set(self.stop_ids))))
        return self.engine.generate(prompt_ids, n, sampling)

    def update_weights(self, source: Iterable[tuple[str, Tensor]] | None, version: int) -> None:
        ranks = distributed.current()
        if ranks.is_main:
            self.engine.update_weights(source, version)
        else:
            for _ in source or ():  # take part in gathering the full weights
                pass
        distributed.barrier()
        if not ranks.is_main and self.engine.weight_version() != str(version):
            raise EngineError(f"rollout server at {self.engine.url} does not report weight version {version}")
        self.version = version

    def close(self) -> None:
        self.engine.close()


def logprob_diff(engine_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and max over response tokens of |engine - trainer| log-probs, (N, L) each."""
    diff = (engine_logprobs.to(trainer_logprobs.device) - trainer_logprobs).abs()[mask]
    if diff.numel() == 0:
        return {"rollout/logprob_diff_mean": 0.0, "rollout/logprob_diff_max": 0.0}
    return {"rollout/logprob_diff_mean": diff.mean().item(), "rollout/logprob_diff_max": diff.max().item()}
