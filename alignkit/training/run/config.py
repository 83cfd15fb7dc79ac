"""The resolved configuration of a training run: one dataclass, each field's docstring is its
`--help`. `--set key=value` overrides either a field or an algorithm hyper-parameter."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro
import yaml


@dataclass
class TrainConfig:
    """Configuration of `alignkit train ALGO`."""

    algorithm: Annotated[str, tyro.conf.Suppress] = "dpo"
    """Registered algorithm name (`alignkit algorithms` lists them)."""
    model: str = "smollm2-135m"
    """Local directory, hub id, or `smollm2-135m` (the embedded default)."""
    data: str | None = None
    """JSONL/JSON/Parquet/CSV file, a directory of them, or a hub dataset id."""
    output: str = "runs/alignkit"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/ and final/ go here."""
    ref_model: str | None = None
    """Reference model for reference-based losses; default: the initial policy itself."""
    reward: str | None = None
    """Online algorithms: reward function, `module:function`, `file.py:function` or a built-in (vader, ...)."""
    reward_model: str | None = None
    """Online algorithms: directory of a sequence-classification reward model."""
    batch_size: int = 8
    """Examples (pairs for preference data) per micro-batch; a step sees batch_size x grad_accum."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float | None = None
    """Peak learning rate (default depends on the algorithm and on LoRA)."""
    max_steps: int = -1
    """Optimizer steps; -1 derives them from --epochs."""
    epochs: float = 1.0
    """Passes over the data when --max-steps is -1."""
    max_length: int = 512
    """Maximum tokens of prompt + response; longer responses are truncated (counted in the log)."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; longer prompts keep their end (counted in the log)."""
    seed: int = 42
    """Seed for data order, initialisation and dropout."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warm-up."""
    scheduler: str = "cosine"
    """Learning-rate decay after warm-up: cosine, linear or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: int | None = None
    """LoRA alpha (default 2 x rank)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names for LoRA, or all-linear."""
    save_steps: int = 0
    """Write a checkpoint every N steps (0: only final/)."""
    save_total_limit: int = 2
    """Checkpoints kept in DIR/checkpoints (oldest removed first)."""
    logging_steps: int = 1
    """Log metrics every N steps."""
    eval_data: str | None = None
    """Held-out data to evaluate on; default: --eval-holdout of the training data."""
    eval_holdout: float = 0.0
    """Fraction (or count if >= 1) of the training rows held out for evaluation."""
    eval_steps: int = 0
    """Evaluate every N steps (0: only at the end, when there is eval data)."""
    resume: str | None = None
    """Run directory to continue from its latest checkpoint."""
    chat_template: bool | None = None
    """Wrap plain-text prompts in the tokenizer's chat template (default: only conversational data)."""
    allow_identical_pairs: bool = False
    """Accept pairs whose chosen and rejected are equal (otherwise an error)."""
    nonfinite: str = "skip"
    """On a NaN/inf loss or gradient: skip the step (weights untouched) or stop."""
    dtype: str = "auto"
    """float32, bfloat16 or auto (bf16 on GPUs that support it, float32 on CPU)."""
    device: str = "auto"
    """cpu, cuda or auto."""
    tensorboard: bool = False
    """Also write TensorBoard event files to DIR/tensorboard."""
    trust_remote_code: bool = False
    """Allow a model's own Python code to run (off unless asked for)."""
    progress: bool = True
    """Show a progress bar."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    strategy: str = "ddp"
    """Data parallelism under torchrun: ddp (replicated weights) or fsdp2 (weights, gradients and
    optimizer state sharded per decoder block). Ignored in one process."""
    logp_chunk_size: int = 1024
    """Response positions per chunk when computing log-probs from hidden states."""
    overwrite: bool = False
    """Start afresh in an --output that holds another run (its files are replaced)."""
    override: str = ""
    """With --resume: comma-separated config keys allowed to differ from the saved run (e.g. lr,max_steps)."""
    allow_degenerate: bool = False
    """Keep going when a run cannot learn (every step skipped, identical pairs, zero reward variance)."""
    split: str | None = None
    """Split to train on when --data is a directory or dataset with several (default: train)."""
    data_format: str = "auto"
    """Row schema: auto (detected), or hh for Anthropic HH-RLHF (chosen/rejected transcripts, no prompt)."""
    reward_timeout: float = 600.0
    """Seconds a reward function may take for one batch before the run stops with an error."""
    reward_workers: int = 0
    """Threads scoring reward batches concurrently (0: in the training thread); for slow or remote rewards."""
    threads: int = 0
    """torch CPU threads (0: one per core, fewer when other processes already load the cores)."""
    hparams: Annotated[dict[str, Any], tyro.conf.Suppress] = field(default_factory=dict)
    """Algorithm hyper-parameters (beta, label_smoothing, gamma, ...), set with --set."""

    def apply_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """Set config fields by name; any other key becomes an algorithm hyper-parameter."""
        names = {f.name for f in dataclasses.fields(self)} - {"hparams"}
        for key, value in overrides.items():
            key = key.replace("-", "_")
            if key in names:
                setattr(self, key, value)
            else:
                self.hparams[key] = value
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        hparams = dict(values.pop("hparams", None) or {})
        config = cls()
        config.apply_overrides(values)
        config.hparams.update(hparams)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping of config keys")
        return cls.from_dict(values)


def parse_set_values(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse `key=value` strings; values are read as YAML (numbers, bools, lists)."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return parsed
