"""`--rollout vllm`: the rollout role played by a vLLM server over HTTP (`HTTPEngine`).

The server holds its own copy of the policy: after every update the trainer's weights (LoRA
merged, HF names) are written once and reloaded by the server, and the version it reports must
be the step. Its log-probs come from other kernels, so they are not exact: the loop recomputes
the old log-probs with the trainer and logs `rollout/logprob_diff_mean|max` (|engine - trainer|
per token) at temperature 1. With `--vllm-url` every torchrun rank sends its own prompt groups
to the one server and rank 0 alone writes and reloads the weights (every rank still walks the
weight iterator: under FSDP2 gathering them is a collective); without it each process starts
a server of its own from `--vllm-python` (`ServerRollout.launch`) and syncs it.

`--vllm-lora-sync adapter` (a LoRA policy): the server holds the base weights and each update
sends the adapter alone (`alignkit.rollout.lora_sync`); a launched server starts on the base
(the adapter left out, whatever it holds on --resume) with vLLM's runtime LoRA turned on, and
the loop's sync at step 0 loads the adapter before the first generation.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from alignkit.rollout import Rollout, SamplingParams
from alignkit.rollout.http_engine import EngineError, HTTPEngine
from alignkit.rollout.lora_sync import adapter_name, servable_config, server_lora_flags
from alignkit.training.online.roles import eos_ids
from alignkit.training.run import distributed

log = logging.getLogger("alignkit")


class ServerRollout:
    """A rollout engine in another process, reached by `HTTPEngine`. `shared`: one server for
    every torchrun rank (`--vllm-url`; rank 0 syncs it), else this process's own (`server`,
    stopped by `close`). `adapter`: the adapter_config.json of adapter-only sync (None: merged
    weights are sent)."""

    shares_policy = False
    exact_logprobs = False

    def __init__(self, engine: HTTPEngine, tokenizer: Any, model: Any, *, shared: bool = True,
                 server: Any = None, cleanup: tuple[Path, ...] = (), adapter: dict | None = None) -> None:
        self.engine, self.shared, self.server, self.cleanup = engine, shared, server, cleanup
        self.pad_id = int(tokenizer.pad_token_id)
        self.stop_ids = eos_ids(tokenizer, model)
        self.adapter = adapter
        self.merged_weights = adapter is None  # adapter sync: the trained LoRA matrices by their own names
        self.base_synced = server is not None  # a server alignkit started holds the base it was given
        self.version = 0

    @property
    def wants_base(self) -> bool:
        """Adapter sync to a server of unknown weights (--vllm-url): the first sync sends the
        base too, so the adapter never lands on whatever the server held before."""
        return self.adapter is not None and not self.base_synced

    @classmethod
    def launch(cls, config: Any, model: Any, tokenizer: Any, name: str | None = None) -> ServerRollout:
        """Start this process's vLLM server from `config.vllm_python` on the policy's current
        weights (saved once under /dev/shm, LoRA merged), logging to OUTPUT/`name`
        (default vllm-rank{r})."""
        from alignkit.models import save_pretrained_merged
        from alignkit.rollout.http_engine import weights_root
        from alignkit.rollout.vllm_server import start_vllm_server

        adapter = adapter_sync_config(config, model)
        lora_flags, lora_env = ((), {}) if adapter is None else (
            server_lora_flags(int(adapter["r"])), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
        model_dir = Path(tempfile.mkdtemp(prefix="alignkit-vllm-model-", dir=weights_root()))
        try:
            save_pretrained_merged(model, tokenizer, model_dir, merge_lora=True, adapters=adapter is None)
            name = name or f"vllm-rank{distributed.current().rank}"
            server = start_vllm_server(config.vllm_python, model_dir, Path(config.output) / name,
                                       logprobs_mode=config.vllm_logprobs_mode,
                                       extra=lora_flags + tuple(shlex.split(config.vllm_args)), env=lora_env)
        except BaseException:
            shutil.rmtree(model_dir, ignore_errors=True)
            raise
        log.info("vLLM server for the rollout at %s (log: %s)", server.url, server.log_path)
        engine = HTTPEngine(server.url, logprobs_mode=config.vllm_logprobs_mode, pad_id=tokenizer.pad_token_id)
        return cls(engine, tokenizer, model, shared=False, server=server, cleanup=(model_dir,), adapter=adapter)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        if not sampling.ignore_eos:
            sampling = dataclasses.replace(
                sampling, stop_token_ids=tuple(sorted(set(sampling.stop_token_ids) | set(self.stop_ids))))
        return self.engine.generate(prompt_ids, n, sampling)

    def update_weights(self, source: Iterable[tuple[str, Tensor]] | None, version: int) -> None:
        ranks = distributed.current()
        if not self.shared or ranks.is_main:
            if self.adapter is None:
                self.engine.update_weights(source, version)
            else:
                base, trained = split_base(source or ())
                if base:  # the first sync to a server of unknown weights (`wants_base`)
                    self.engine.update_weights(base, version)
                self.engine.update_adapter(trained, version, self.adapter)
        else:
            for _ in source or ():  # take part in gathering the full weights
                pass
        self.base_synced = True
        if self.shared:
            distributed.barrier()
            if not ranks.is_main:
                if self.engine.weight_version() != str(version):
                    raise EngineError(f"rollout server at {self.engine.url} does not report weight version {version}")
                if self.adapter is not None:  # rank 0 loaded it under the version's name
                    self.engine.model = adapter_name(version)
        self.version = version

    def close(self) -> None:
        """Remove the weight files; stop the server this process started."""
        self.engine.close()
        if self.server is not None:
            self.server.stop()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def split_base(source: Iterable[tuple[str, Tensor]]) -> tuple[list, list]:
    """(base weights by HF names, LoRA matrices by peft names) of a sync source: the trained
    LoRA parameters are the `base_model.model.*.lora_*` ones."""
    base, trained = [], []
    for name, tensor in source:
        (trained if name.startswith("base_model.model.") and ".lora_" in name else base).append((name, tensor))
    return base, trained


def adapter_sync_config(config: Any, model: Any) -> dict | None:
    """adapter_config.json for `--vllm-lora-sync adapter` (None: merged weights are sent);
    refuses a policy without a servable peft LoRA adapter."""
    from alignkit.models import is_peft

    if getattr(config, "vllm_lora_sync", "merged") != "adapter":
        return None
    if not is_peft(model):
        raise ValueError("--vllm-lora-sync adapter sends a LoRA adapter: the policy has none (set --lora-r)")
    return servable_config(model.peft_config["default"])


def logprob_diff(engine_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and max over response tokens of |engine - trainer| log-probs, (N, L) each."""
    diff = (engine_logprobs.to(trainer_logprobs.device) - trainer_logprobs).abs()[mask]
    if diff.numel() == 0:
        return {"rollout/logprob_diff_mean": 0.0, "rollout/logprob_diff_max": 0.0}
    return {"rollout/logprob_diff_mean": diff.mean().item(), "rollout/logprob_diff_max": diff.max().item()}
