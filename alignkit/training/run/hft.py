"""HFT, Half Fine-Tuning (Hui et al. 2024, arXiv 2404.18466), per ALGORITHMS-addendum §3:
each round, a random half of the parameters is frozen at category level inside every block
(whole matrices, no element masks) and the other half trains.

Rule per transformer block of a Llama-style model (freeze ratio 1/2):
- attention: 2 of {q_proj, k_proj, v_proj, o_proj} frozen, drawn uniformly;
- FFN: in floor(L/2) blocks drawn at random 2 of {gate_proj, up_proj, down_proj} frozen, in
  the other blocks 1 of 3 (which ones: uniform), so over the blocks half the FFN matrices;
- norms: 1 of {input_layernorm, post_attention_layernorm} frozen;
- outside the blocks (token embeddings, LM head, final norm, a reward model's score head, an
  online critic): always trained.
A category's bias (Qwen2's q/k/v) goes with its weight. The draw of round r is a pure function
of (seed, r), so a resumed run redraws exactly what it had. A round is `hft_round_steps`
optimizer steps of the offline trainer, or steps of the online loop (each K epochs x M
minibatches); 0 (the default) makes the whole run one round, the paper's "per stage".

Frozen tensors keep requires_grad (the checkpoint holds every trained weight, and the
data-parallel wrappers see one fixed set of parameters): after backward their gradients are
dropped (`p.grad = None`), so gradient clipping, weight decay and Adam's moments skip them and
they stay bit-identical through their round. (The backward still computes those gradients: HFT
here changes what is learned, not the cost of a step.) Their Adam moments from an earlier round
are kept, and resume when the tensor trains again.
Each round's draw is written to DIR/hft/round-NNNNNN.json; `hft/trainable_fraction` (trained
parameters / all the model's parameters) and `hft/round` are logged every step.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from alignkit.models.blocks import transformer_blocks

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
CATEGORIES = ATTENTION + FFN + NORMS
ROUND_DIR = "hft"


def round_of_step(step: int, round_steps: int) -> int:
    """Round of optimizer step `step` (1-based): (step - 1) // N, or 0 when N = 0 (one round).

    N = 3: steps 1, 2, 3 -> round 0; steps 4, 5, 6 -> round 1."""
    return 0 if round_steps <= 0 else (step - 1) // round_steps


def draw_frozen(num_blocks: int, seed: int, round_index: int) -> list[tuple[str, ...]]:
    """The categories frozen in each block in round `round_index` (the rule in the module doc),
    sorted in CATEGORIES order; a pure function of (num_blocks, seed, round_index).

    L = 4 blocks: 2 attention + 1 norm frozen in each, 2 FFN matrices in 2 blocks and 1 in the
    other 2: 2 x 4 + 2 x 2 + 1 x 2 + 4 = 18 of 36 matrices and vectors frozen."""
    rng = random.Random(f"alignkit-hft:{seed}:{round_index}")  # str seeds hash with sha512: stable
    order = list(range(num_blocks))
    rng.shuffle(order)
    two_ffn = set(order[: num_blocks // 2])
    frozen = []
    for block in range(num_blocks):
        chosen = set(rng.sample(ATTENTION, 2)) | set(rng.sample(FFN, 2 if block in two_ffn else 1))
        chosen |= set(rng.sample(NORMS, 1))
        frozen.append(tuple(c for c in CATEGORIES if c in chosen))
    return frozen


def block_layout(model: nn.Module) -> list[dict[str, list[str]]]:
    """For each transformer block, category -> the full names of its parameters (weight, and
    bias where there is one). A block whose parameters are not exactly these categories (GPT-2's
    c_attn/c_fc, Qwen3's q_norm) is a ValueError naming it: HFT's split is defined for them."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"--set hft=true: found no transformer blocks in {type(model).__name__}")
    layout = []
    for block_name, block in blocks:
        categories: dict[str, list[str]] = {c: [] for c in CATEGORIES}
        unknown = []
        for name, _ in block.named_parameters():
            module_path = name.rpartition(".")[0]
            category = module_path.rpartition(".")[2]
            if category in categories:
                categories[category].append(f"{block_name}.{name}")
            else:
                unknown.append(name)
        missing = [c for c, names in categories.items() if not names]
        if unknown or missing:
            problem = (f"parameters outside them ({', '.join(unknown[:3])})" if unknown
                       else f"no {', '.join(missing)}")
            raise ValueError(
                f"--set hft=true: block {block_name} ({type(block).__name__}) is not a Llama-style block of HFT's "
                f"categories ({'/'.join(ATTENTION)}, {'/'.join(FFN)}, {'/'.join(NORMS)}): it has {problem}")
        layout.append(categories)
    return layout


def frozen_names(layout: list[dict[str, list[str]]], frozen: list[tuple[str, ...]]) -> frozenset[str]:
    """Parameter names of the frozen categories, block by block."""
    return frozenset(name for block, cats in zip(layout, frozen, strict=True) for c in cats for name in block[c])


def write_json_atomically(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


class HalfFineTuning:
    """One run's HFT: `enter_step(step)` before the step's backward (redraws at a new round,
    returns the step's metrics), `drop_frozen_grads()` after it, before clipping."""

    def __init__(self, model: nn.Module, *, seed: int, round_steps: int, run_dir: Path | None,
                 write: bool = True) -> None:
        self.model, self.seed, self.round_steps = model, seed, round_steps
        self.run_dir, self.write = run_dir, write
        self.layout = block_layout(model)
        self.numel = {name: p.numel() for name, p in model.named_parameters()}
        self.round: int | None = None
        self.frozen: frozenset[str] = frozenset()
        self.trainable_fraction = 1.0

    def enter_step(self, step: int) -> dict[str, float]:
        """Draw the round of `step` if it is a new one; {hft/trainable_fraction, hft/round}."""
        index = round_of_step(step, self.round_steps)
        if index != self.round:
            self.round = index
            choice = draw_frozen(len(self.layout), self.seed, index)
            self.frozen = frozen_names(self.layout, choice)
            total = sum(self.numel.values())
            self.trainable_fraction = 1.0 - sum(self.numel[n] for n in self.frozen) / total
            if self.write and self.run_dir is not None:
                write_json_atomically(Path(self.run_dir) / ROUND_DIR / f"round-{index:06d}.json",
                                      self.round_record(index, choice))
        return {"hft/trainable_fraction": self.trainable_fraction, "hft/round": float(index)}

    def round_record(self, index: int, choice: list[tuple[str, ...]]) -> dict[str, Any]:
        """What DIR/hft/round-NNNNNN.json holds: the round's steps and each block's halves."""
        block_total = sum(self.numel[n] for block in self.layout for names in block.values() for n in names)
        frozen_total = sum(self.numel[n] for n in self.frozen)
        first = index * self.round_steps + 1 if self.round_steps > 0 else 1
        return {
            "round": index, "seed": self.seed, "round_steps": self.round_steps, "first_step": first,
            "last_step": first + self.round_steps - 1 if self.round_steps > 0 else None,
            "trainable_fraction": self.trainable_fraction,
            "block_trainable_fraction": 1.0 - frozen_total / block_total,
            "always_trained": "every parameter outside the blocks (embeddings, LM head, final norm, heads)",
            "blocks": [{"block": b, "trainable": [c for c in CATEGORIES if c not in frozen], "frozen": list(frozen)}
                       for b, frozen in enumerate(choice)],
        }

    def drop_frozen_grads(self) -> None:
        """Set the gradients of this round's frozen parameters to None (the optimizer and the
        gradient clip then skip them)."""
        for name, param in self.model.named_parameters():
            if name in self.frozen:
                param.grad = None


def half_fine_tuning(config: Any, model: nn.Module, run_dir: Path | None, *, is_main: bool) -> HalfFineTuning | None:
    """The run's HalfFineTuning when `config.hft` is on (rank 0 writes the round files), else None."""
    if not config.hft:
        return None
    return HalfFineTuning(model, seed=config.seed, round_steps=config.hft_round_steps, run_dir=run_dir,
                          write=is_main)
