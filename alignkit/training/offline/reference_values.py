"""Reference outputs of any shape, computed once before training (sibling of `reference.py`).

`reference.py` caches one (chosen, rejected) pair of log-probs per example. Listwise, unpaired
and A-LoL tasks need other shapes: K log-probs of a ranked list, one log-prob of an unpaired
example, per-token log-probs of a response. A task states them with

    task.reference_values(model, batch) -> {name: [1-D tensor per example of the batch]}

and `attach_reference_values` stores `example.extras[name]` (a float32 1-D tensor) for every
train and eval example, caching them in `DIR/<cache>.safetensors` (values concatenated, plus
per-example lengths) so that a resumed run does not recompute them. The cache is keyed by
`cache_fingerprint`: the content of the tokenised examples, the reference model's weights and
the tokenizer, so other data or another model in the same directory recompute it.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from alignkit.training.offline.reference import load_reference, reference_batches
from alignkit.training.offline.reference_cache import (
    cache_fingerprint,
    load_cached_tensors,
    save_cached_tensors,
)
from alignkit.training.run import distributed
from alignkit.training.run.config import TrainConfig

log = logging.getLogger("alignkit")


@torch.no_grad()
def compute_reference_values(task, model, examples, pad_id: int, config: TrainConfig, desc: str):
    """{name: [tensor per example]} in the order of `examples` (batched by length)."""
    values: dict[str, list] = {}
    for indices, batch in reference_batches(task, model, examples, pad_id, config, desc):
        for name, per_example in task.reference_values(model, batch).items():
            column = values.setdefault(name, [None] * len(examples))
            for i, value in zip(indices, per_example, strict=True):
                column[i] = value.detach().float().cpu().reshape(-1)
    if distributed.current().distributed:  # each rank filled its share of the batches
        names = sorted(set().union(*distributed.all_gather_json(sorted(values))))
        values = {name: distributed.gather_by_index(values.get(name, [None] * len(examples))) for name in names}
    return values


def attach_reference_values(task, model, tokenizer, examples, eval_examples, config, run_dir,
                            cache: str = "reference_values", key: str = "") -> None:
    """Fill `extras[name]` of every train and eval example with the task's reference values.

    `key` names whatever else the values depend on (e.g. T-REG's prompt templates), so a run
    with other settings in the same directory recomputes them instead of reusing the cache."""
    splits = {"train": examples, "eval": eval_examples}
    path = Path(run_dir) / f"{cache}.safetensors"
    fingerprint = cache_fingerprint(config, model, tokenizer, splits, f"{config.algorithm}:{cache}:{key}")
    tensors = load_cached_tensors(path, fingerprint)
    if not tensors:
        reference, owned = load_reference(config, model, tokenizer)
        for name, split in splits.items():
            if not split:
                continue
            values = compute_reference_values(
                task, reference, split, tokenizer.pad_token_id, config, f"reference ({name})"
            )
            for key, column in values.items():
                tensors[f"{name}/{key}/values"] = torch.cat(column)
                tensors[f"{name}/{key}/lengths"] = torch.tensor([len(v) for v in column])
        if owned:
            del reference
            gc.collect()
        if distributed.current().is_main:
            save_cached_tensors(tensors, path, fingerprint)
    for name, split in splits.items():
        keys = {k.split("/")[1] for k in tensors if k.startswith(f"{name}/")}
        for key in keys:
            lengths = tensors[f"{name}/{key}/lengths"].tolist()
            chunks = torch.split(tensors[f"{name}/{key}/values"], lengths)
            for example, chunk in zip(split, chunks, strict=True):
                example.extras[key] = chunk.clone()
