"""Learning HMA's per-block ratios (Lin et al. 2024, "Mitigating the Alignment Tax of RLHF").

The merged weights are a differentiable function of the block scores s (K,):

    α = ᾱ K (σ(s) + ε) / Σ_j (σ(s_j) + ε)                 (mean ratio fixed at ᾱ)
    θ(s)[p] = θ_B[p] + α_{g(p)} (θ_A[p] − θ_B[p])           (g(p): the block of parameter p)

and s takes a few Adam steps on the SFT loss of reward-filtered (RAFT-style) completions,

    L(s) = − Σ log π_θ(s)(y|x) / Σ |y|  +  reg · Σ_k c_k |α_k − ᾱ|,

computed through the merged weights with `torch.func.functional_call`, so the model's own
weights are never touched. c_k = the number of linear weight matrices in block k's layers
(`linear_counts`): the reference adds one L1 term per `nn.Linear` module, all modules of a
block sharing the block's α.

Defaults, from the reference code (avalonstrel/Mitigating-the-Alignment-Tax-of-RLHF):
- ε = 0.2 (`REFERENCE_EPSILON`): `scripts/mask_post/run_mask_finetune_raft.sh` sets
  `epsilon=0.2`, used by `src/lmflow/pipeline/utils/mask_trainer.py::MaskNormalizedSigmoidLinear`
  exactly as above (`init_val * (sigmoid(a) + eps) / sum(sigmoid(a_j) + eps) * len`). The
  paper's formula has no ε; ε > 0 flattens the ratios and keeps each α_k ≥ ᾱ ε / (1 + ε).
- reg = 1e-4 (`REFERENCE_REG`): the same script's `reg_alpha=1e-4` with `sum_reg_type=0.2`,
  which `MaskTrainer.compute_loss` reads as an L1 penalty |α − init_val| per linear module.
  Deviation: that `.2` suffix also weights each module by 25 / (|layer − 13| + 1), a curve
  centred on layer 13 of its 26-layer OpenLLaMA-3B; it has no meaning at other depths, so
  alignkit weights every linear module 1 (the reference's `sum_reg_type` 0.0).
Not adopted: the reference's lr 2e-5 over one epoch of its collected data (thousands of
HF Trainer steps); alignkit's defaults take a few larger steps (`--steps 20 --lr 0.05`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignkit.merge.methods import StateDict, hma_ratios, initial_scores

log = logging.getLogger("alignkit")

REFERENCE_EPSILON = 0.2
"""ε of the reference's run script (`run_mask_finetune_raft.sh`: epsilon=0.2)."""
REFERENCE_REG = 1e-4
"""L1 weight of the reference's run script (`run_mask_finetune_raft.sh`: reg_alpha=1e-4)."""


class _ScoredModel(nn.Module):
    """Wraps the template so that `functional_call` swaps its weights for the merged ones."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        from alignkit.merge.scoring import summed_logps

        return summed_logps(self.model, batch)


def linear_counts(state: Mapping[str, Tensor], groups: Mapping[str, int | None],
                  layer_of: Mapping[str, int | None], num_blocks: int) -> list[int]:
    """c_k = the number of linear weight matrices (2-D `*.weight` tensors inside a transformer
    layer) whose layer is in block k; the embeddings and the head lie outside the layers."""
    counts = [0] * num_blocks
    for name, group in groups.items():
        if group is not None and layer_of.get(name) is not None and name.endswith("weight") and state[name].ndim == 2:
            counts[group] += 1
    return counts


@dataclass
class HMAResult:
    ratios: list[float]
    scores: list[float]
    history: list[dict]
    """One row per step: step, loss, nll (per token), ratios."""


def merged_parameters(theta_b: Mapping[str, Tensor], delta: Mapping[str, Tensor], groups: Mapping[str, int | None],
                      ratios: Tensor, mean_ratio: float) -> StateDict:
    """θ(s)[p] = θ_B[p] + α_{g(p)} (θ_A[p] − θ_B[p]) with `delta` = θ_A − θ_B; α = ᾱ for None."""
    return {name: theta_b[name] + (mean_ratio if group is None else ratios[group]) * delta[name]
            for name, group in groups.items()}


def optimise_hma(
    model: nn.Module,
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    groups: Mapping[str, int | None],
    num_blocks: int,
    mean_ratio: float,
    batches: list[dict[str, Tensor]],
    *,
    steps: int,
    lr: float,
    epsilon: float = REFERENCE_EPSILON,
    reg: float = REFERENCE_REG,
    penalty_weights: list[float] | None = None,
    seed: int = 0,
    on_step: Callable[[dict], None] | None = None,
) -> HMAResult:
    """`steps` Adam steps on s (see the module docstring), batches in a seeded shuffled cycle.
    `model` is a plain causal LM of the inputs' architecture (its own weights stay as they are);
    `penalty_weights`: c_k of the module docstring (`linear_counts`), default 1 per block."""
    from torch.func import functional_call

    if steps < 1 or not batches:
        raise ValueError("HMA optimisation needs at least one step and one batch")
    device = next(model.parameters()).device
    theta_b = {n: theta_b[n].to(device) for n in groups}
    delta = {n: theta_a[n].to(device) - theta_b[n] for n in groups}
    weights = [1.0] * num_blocks if penalty_weights is None else [float(c) for c in penalty_weights]
    if len(weights) != num_blocks:
        raise ValueError(f"penalty_weights: {len(weights)} values for {num_blocks} blocks")
    penalty = torch.tensor(weights, dtype=torch.float32, device=device)
    scores = initial_scores(num_blocks, mean_ratio).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([scores], lr=lr)
    wrapped = _ScoredModel(model).eval()
    order = list(range(len(batches)))
    random.Random(seed).shuffle(order)
    history = []
    for step in range(1, steps + 1):
        batch = batches[order[(step - 1) % len(order)]]
        ratios = hma_ratios(scores, mean_ratio, epsilon)
        params = merged_parameters(theta_b, delta, groups, ratios, mean_ratio)
        logp, tokens = functional_call(wrapped, {f"model.{n}": t for n, t in params.items()}, (batch,))
        nll = -logp / tokens.clamp(min=1)
        loss = nll + reg * (penalty * (ratios - mean_ratio).abs()).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        row = {"step": step, "loss": float(loss.detach()), "nll": float(nll.detach()),
               "ratios": [float(r) for r in hma_ratios(scores.detach(), mean_ratio, epsilon)]}
        history.append(row)
        log.info("hma step %d: nll %.4f, ratios %s", step, row["nll"], ", ".join(f"{r:.4f}" for r in row["ratios"]))
        if on_step is not None:
            on_step(row)
    final = hma_ratios(scores.detach(), mean_ratio, epsilon)
    return HMAResult([float(r) for r in final], [float(s) for s in scores.detach()], history)
