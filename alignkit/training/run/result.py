"""What a training run returns: where it wrote its files, its last metrics, the trained model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
