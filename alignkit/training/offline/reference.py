"""Reference log-probs for offline preference losses, computed once before training.

The reference is the initial policy (or `--ref-model`); its summed response log-probs for
every pair (the task's `reference_logps`, e.g. LD-DPO sums when `ld_alpha` is set) are stored in each example's extras (`ref_chosen`, `ref_rejected`) and cached in
`DIR/reference_logps.safetensors`, so no reference model stays in memory while training and
a resumed run does not recompute them (keyed by the content of the examples, the reference's
weights and the tokenizer: `reference_cache.py`). Under torchrun each rank computes every W-th
batch, the values are all-reduced (zeros elsewhere, so the sums are exact) and rank 0 writes the cache.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.models import adapter_disabled, is_peft
from alignkit.training.offline.reference_cache import (
    cache_fingerprint,
    load_cached_tensors,
    save_cached_tensors,
)
from alignkit.training.run import distributed
from alignkit.training.run.config import TrainConfig

log = logging.getLogger("alignkit")
CACHE_NAME = "reference_logps.safetensors"


def reference_batches(task, model, examples, pad_id: int, config: TrainConfig, desc: str) -> Iterator:
    """(indices, batch on the model's device) over `examples` ordered by length, one optimizer
    step's rows (`batch_size x grad_accum`: without gradients a forward holds one layer's
    activations, not every layer's) at a time, with a progress bar; while it runs the model is in eval mode with any LoRA
    adapter disabled (the reference is the initial policy), and its mode is restored after.
    Under torchrun a rank yields only its share of the batches (every W-th)."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: task.length(examples[i]))
    size = max(1, config.batch_size) * max(1, config.grad_accum)
    was_training = model.training
    model.eval()
    try:
        with adapter_disabled(model) if is_peft(model) else nullcontext():
            starts = distributed.shard_items(range(0, len(order), size), distributed.current())
            shown = config.progress and distributed.current().is_main
            for start in tqdm(starts, desc=desc, disable=not shown, leave=False):
                indices = order[start : start + size]
                batch = task.collate([examples[i] for i in indices], pad_id)
                yield indices, _on_device(batch, device)
    finally:
        model.train(was_training)


def _on_device(batch: dict, device) -> dict:
    """The batch's tensors, and those of nested dicts (a VLM batch's `pixel_inputs`), on `device`."""
    return {
        k: v.to(device) if torch.is_tensor(v) else _on_device(v, device)
        for k, v in batch.items() if torch.is_tensor(v) or isinstance(v, dict)
    }


@torch.no_grad()
def compute_reference_logps(task, model, examples, pad_id: int, config: TrainConfig, desc: str):
    """(chosen, rejected) summed log-probs (N,) of every example under `model`."""
    chosen = torch.zeros(len(examples))
    rejected = torch.zeros(len(examples))
    for indices, batch in reference_batches(task, model, examples, pad_id, config, desc):
        ref_chosen, ref_rejected = task.reference_logps(model, batch)
        chosen[indices] = ref_chosen.float().cpu()
        rejected[indices] = ref_rejected.float().cpu()
    return distributed.all_reduce_sum(chosen), distributed.all_reduce_sum(rejected)


def load_reference(config: TrainConfig, model, tokenizer):
    """`(reference, owned)`: `--ref-model` loaded next to the policy, or the policy itself."""
    if not config.ref_model:
        return model, False
    from alignkit.merge.spec import resolve_model_and_tokenizer

    reference, ref_tokenizer = resolve_model_and_tokenizer(
        config.ref_model,
        dtype=None if config.dtype == "auto" else config.dtype,
        device=str(next(model.parameters()).device),
        trust_remote_code=config.trust_remote_code,
    )
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--ref-model {config.ref_model}: its tokenizer differs from the policy's")
    reference.eval().requires_grad_(False)
    return reference, True


def attach_reference_logps(task, model, tokenizer, examples, eval_examples, config, run_dir):
    """Fill `extras['ref_chosen'|'ref_rejected']` of every train and eval example."""
    splits = {"train": examples, "eval": eval_examples}
    cache = Path(run_dir) / CACHE_NAME
    fingerprint = cache_fingerprint(config, model, tokenizer, splits, getattr(task, "reference_key", None))
    tensors = load_cached_tensors(cache, fingerprint)
    if not tensors:
        reference, owned = load_reference(config, model, tokenizer)
        for name, split in splits.items():
            if split:
                chosen, rejected = compute_reference_logps(
                    task, reference, split, tokenizer.pad_token_id, config, f"reference log-probs ({name})"
                )
                tensors[f"{name}_chosen"], tensors[f"{name}_rejected"] = chosen, rejected
        if owned:
            del reference
            gc.collect()
        if distributed.current().is_main:
            save_cached_tensors(tensors, cache, fingerprint)
    for name, split in splits.items():
        for i, example in enumerate(split):
            example.extras["ref_chosen"] = float(tensors[f"{name}_chosen"][i])
            example.extras["ref_rejected"] = float(tensors[f"{name}_rejected"][i])
