"""The resolved configuration of a training run: one dataclass, each field's docstring is its
`--help`. `--set key=value` overrides either a field or an algorithm hyper-parameter."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro
import yaml

from alignkit.training.run.values import allowed_types, coerce_field, load_yaml_file, parse_scalar


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
    reward: str | list[str] | None = None
    """Online algorithms: reward function, `module:function`, `file.py:function` or a built-in (vader, ...),
    or `rlhs:CONFIG.yaml` (RLHS's hindsight-simulation reward, alignkit/agents/hindsight.py);
    repeat --reward for several (each logged as reward/NAME, combined by --reward-weights)."""
    reward_weights: str | None = None
    """Several --reward: comma-separated weights, one per reward in order (default 1 each)."""
    reward_model: str | None = None
    """Online algorithms: directory of a sequence-classification reward model."""
    cost: str | None = None
    """safe_ppo: cost function (`module:function`, `file.py:function`; higher = less safe), like --reward."""
    preference_model: str | None = None
    """nash_md: directory of a pairwise preference model (`alignkit train preference_model`) judging
    each policy sample against its opponent; default: sigmoid(r(y) - r(y')) of the reward."""
    teacher: str | None = None
    """distill: directory of the teacher model (same vocabulary as --model); the KL is taken to it."""
    env: str | None = None
    """Online algorithms: multi-turn rollouts against an environment, `module:Factory` or `file.py:Factory`
    (a zero-argument factory of objects with reset(row) and step(messages); alignkit.agents.protocol),
    or an adapter (textarena:GAME, verifiers:ENV, gymnasium:ENV_ID, trl:module:Class). Its rewards add to --reward's."""
    tools: str | None = None
    """Online algorithms: tools the policy may call, `module:fn1,fn2` or `file.py:fn1,fn2` (plain functions
    with type hints and docstrings); a rollout becomes a conversation with them."""
    user_model: str | None = None
    """Online algorithms (refuel): a simulated user answers the policy, written by a causal LM directory or
    `policy` (the policy itself, prompted as the user); alignkit.agents.user_sim."""
    cost_model: str | None = None
    """safe_ppo: directory of a cost model (`alignkit train cost`; cost > 0 means unsafe)."""
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
    """LoRA rank; 0: no LoRA (every weight trains, unless --adapter ssf)."""
    lora_alpha: int | None = None
    """LoRA alpha (default 2 x rank)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names for LoRA, or all-linear."""
    vlm_train: str = "auto"
    """Vision-language models: what trains in full besides the language model, comma-separated
    among projector and vision, or none; auto: none with LoRA (adapters on the language model
    only), projector without. The vision tower stays frozen unless named."""
    adapter: str = "auto"
    """What trains: auto (lora when --lora-r > 0, else none), none (every weight), lora (LoRA of
    rank --lora-r) or ssf (per-feature scale and shift of --ssf-target-modules' outputs, Lian et
    al. 2022; folded into the weights in final/)."""
    ssf_target_modules: str = "all-linear"
    """--adapter ssf: comma-separated linear-layer names, or all-linear (those in the blocks)."""
    hft: bool = False
    """Half Fine-Tuning (Hui et al. 2024): each round, freeze a random half of every block's
    matrices and norms (2 of q/k/v/o, 2 or 1 of gate/up/down, 1 of 2 norms); full weights only."""
    hft_round_steps: int = 0
    """With hft: draw a new frozen half every N steps (0: one half for the whole run)."""
    save_steps: int = 0
    """Write a checkpoint every N steps (0: only final/)."""
    save_total_limit: int = 2
    """Checkpoints kept in DIR/checkpoints (oldest removed first)."""
    logging_steps: int = 1
    """Log metrics every N steps."""
    eval_data: str | None = None
    """Held-out data to evaluate on; default: --eval-holdout of the training data. Online
    algorithms: held-out prompts (same formats as --data), sampled and scored at step 0, every
    --eval-steps steps and the last step (eval/* metrics)."""
    eval_holdout: int | float = 0.0
    """Training rows held out for evaluation: a fraction in (0, 1), or a whole count >= 1."""
    eval_steps: int = 0
    """Evaluate every N steps (0: only at the end, when there is eval data). Online algorithms:
    validate at step 0, every N steps and the last step; N >= 1 with --eval-data."""
    gold_reward: str | None = None
    """Online validation: a second reward spec (like --reward: `file.py:fn`, a built-in, `rm:DIR`)
    scoring the eval samples as eval/gold, e.g. a true reward that exposes over-optimisation."""
    eval_samples: int = 1
    """Online validation: samples per eval prompt (pass@k needs --eval-samples >= k)."""
    eval_k: str = "1"
    """Online validation: comma-separated k of the logged eval/pass@k (e.g. 1,4), each <= --eval-samples."""
    eval_pass_threshold: float = 1.0
    """Online validation: a sample is correct for pass@k when its gold reward (else its training
    reward) is >= this (1: a reward of 1 or more, as a 0/1 correctness reward gives)."""
    resume: str | None = None
    """Run directory to continue from its newest intact checkpoint, with the same config and data
    (see --override); a path without a run is an error."""
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
    padding_free: bool = True
    """Pack each batch's rows end to end and compute a prompt shared by several rows (a DPO
    pair, a GRPO group) once, for decoders where that is exact (llama, mistral, qwen2, qwen3
    with sdpa or eager attention; checked against the padded forward on the first batch).
    Same values up to rounding; false keeps padded batches."""
    overwrite: bool = False
    """Start afresh in an --output that is not empty: a previous run's checkpoints, metrics and
    final/ are removed first (reference caches stay, keyed by the content of data and model; other
    files are left alone). Without it such an --output is refused, also for the identical command
    of a finished run (continue an unfinished one with --resume DIR)."""
    override: str = ""
    """With --resume: comma-separated config keys, hyper-parameters or `data` (its content) allowed
    to differ from the resumed run (e.g. lr,max_steps); each change is logged."""
    allow_degenerate: bool = False
    """Keep going (with a warning) when a run cannot learn: every step skipped, every pair identical
    after truncation, no reward variance, group_size=1 with a group baseline. Otherwise an error,
    up front or after min(steps, 10) steps on which it held from the first."""
    split: str | None = None
    """Split to train on when --data is a directory or dataset with several (default: train;
    --eval-data reads its test or validation split)."""
    data_format: str = "auto"
    """Row schema: auto (detected), or hh for Anthropic HH-RLHF (chosen/rejected transcripts, no prompt)."""
    placement: str = "local"
    """Where the roles run: local (this process, or the torchrun ranks), colocate[:N] (N Ray
    workers, each hosting every role, one torch.distributed group) or split:P,R (P policy
    workers + R rollout workers with their own copy of the weights, synced after every update;
    online algorithms). Results equal local on the same seed."""
    ray_address: str | None = None
    """--placement on Ray: join a running cluster (auto, or HOST:PORT); unset, a local cluster
    on 127.0.0.1 starts and stops with the run."""
    rollout: str = "hf"
    """Online rollout engine: hf (the trained module sampled in process) or vllm (a vLLM
    OpenAI-compatible server over HTTP at --vllm-url, sent the policy's weights after every update)."""
    vllm_url: str | None = None
    """--rollout vllm: base URL of a running vLLM server (http://127.0.0.1:8000) started with
    VLLM_SERVER_DEV_MODE=1 (weight reloads); without it alignkit starts one per process from
    --vllm-python and stops it at the end."""
    vllm_python: str = ".venv-vllm/bin/python"
    """--rollout vllm without --vllm-url: the Python of vLLM's environment (make vllm builds it)."""
    vllm_args: str = ""
    """--rollout vllm without --vllm-url: extra flags for the servers alignkit starts, appended
    to its own (a later flag wins): "--dtype bfloat16 --gpu-memory-utilization 0.3" for a server
    sharing one GPU with training."""
    vllm_logprobs_mode: str = "raw_logprobs"
    """--rollout vllm: the server's --logprobs-mode (raw_logprobs: sample at temperature 1;
    processed_logprobs: any temperature, no top-k/top-p/min-p)."""
    vllm_lora_sync: str = "merged"
    """--rollout vllm with --lora-r: what each update sends the server. merged: the full weights,
    LoRA merged; adapter: the LoRA adapter alone, applied by vLLM's runtime LoRA on the base it
    holds (a server of yours needs --enable-lora --max-lora-rank R and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; the ones alignkit starts get them)."""
    reward_timeout: float = 600.0
    """Seconds a reward function may take for one batch before the run stops with an error (it runs in a
    daemon thread); 0: no limit, called in the training thread (for code that needs the main thread)."""
    reward_workers: int = 0
    """Threads scoring reward batches concurrently, each a chunk of whole prompt groups, results in row order
    (0: one call per batch); for slow or remote rewards that score each row on its own."""
    threads: int = 0
    """torch CPU threads (0: one per core, fewer when other processes already load the cores)."""
    hparams: Annotated[dict[str, Any], tyro.conf.Suppress] = field(default_factory=dict)
    """Algorithm hyper-parameters (beta, label_smoothing, gamma, ...), set with --set."""

    def apply_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """Set config fields by name (each value checked against the field's type, see
        `coerce_field`); any other key becomes an algorithm hyper-parameter."""
        types = field_types()
        for key, value in overrides.items():
            key = key.replace("-", "_")
            if key in types:
                setattr(self, key, coerce_override(key, value, types[key]))
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
        hparams = values.pop("hparams", None) or {}
        if not isinstance(hparams, dict):
            raise ValueError(f"hparams must be a mapping of hyper-parameter names to values, got {hparams!r}")
        config = cls()
        config.apply_overrides(values)
        config.hparams.update(hparams)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """A recipe or a saved config.yaml (YAML 1.2 numbers); errors name the file."""
        values = load_yaml_file(path) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping of config keys")
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


@functools.cache
def field_types() -> dict[str, Any]:
    """TrainConfig field name -> its annotation (hparams excluded)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "hparams"}


def coerce_override(key: str, value: Any, annotation: Any) -> Any:
    """`coerce_field`, except that `reward` may also be a Python callable (alignkit.train)."""
    if key == "reward" and callable(value):
        return value
    return coerce_field(key, value, annotation)


def parse_set_values(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse `key=value` strings. Values of config fields that take text (paths, names) are
    kept as typed (`null` unsets an optional one); all others are read as YAML with YAML 1.2
    numbers (1e-4 is a float), true/false, lists and mappings."""
    types = field_types()
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key in parsed:  # the last one would silently win
            raise ValueError(f"--set {key} given more than once; keep one")
        allowed = allowed_types(types.get(key.replace("-", "_")))
        if str in allowed:
            parsed[key] = None if raw.strip() in ("null", "~") and type(None) in allowed else raw
        else:
            parsed[key] = parse_scalar(raw, key)
    return parsed
