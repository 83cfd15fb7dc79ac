"""What a training run returns: where it wrote its files, its last metrics, the trained model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.models import save_pretrained_merged
from alignkit.training.run.distributed import Ranks, barrier
from alignkit.training.run.wrapping import unshard_parameters

log = logging.getLogger("alignkit")


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    model: Any = field(default=None, repr=False)
    """The trained model in memory (LoRA still attached, not merged)."""
    tokenizer: Any = field(default=None, repr=False)


def write_final(model, tokenizer, run_dir: Path, ranks: Ranks, task=None) -> Path:
    """`run_dir/final` (LoRA merged, with `tokenizer`: a VLM passes its processor) from rank 0;
    FSDP2 shards are gathered first."""
    final_dir = run_dir / "final"
    if ranks.distributed and ranks.strategy == "fsdp2":
        unshard_parameters(model)
    if ranks.is_main:
        final_dir = save_pretrained_merged(model, tokenizer, final_dir)
        if hasattr(task, "write_final"):  # extra files a scorer needs (e.g. brme.json)
            task.write_final(final_dir)
        log.info("final model written to %s", final_dir)
    barrier()
    return final_dir
