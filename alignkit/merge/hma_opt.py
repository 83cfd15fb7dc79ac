"""Learning HMA's per-block ratios (Lin et al. 2024, "Mitigating the Alignment Tax of RLHF").

The merged weights are a differentiable function of the block scores s (K,):

    α = ᾱ K (σ(s) + ε) / Σ_j (σ(s_j) + ε)                 (mean ratio fixed at ᾱ)
    θ(s)[p] = θ_B[p] + α_{g(p)} (θ_A[p] − θ_B[p])           (g(p): the block of parameter p)

and s takes a few Adam steps on the SFT loss of reward-filtered (RAFT-style) completions,

    L(s) = − Σ log π_θ(s)(y|x) / Σ |y|  +  reg · Σ_k |α_k − ᾱ|,

computed through the merged weights with `torch.func.functional_call`, so the model's own
weights are never touched. The reference (`src/lmflow/pipeline/utils/mask_trainer.py`) does the
same with a HF Trainer (lr 2e-5, one epoch over the collected data, epsilon 0.2, an L1
penalty 1e-4 summed over its linear layers); alignkit's defaults take a few larger steps.
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


class _ScoredModel(nn.Module):
    """Wraps the template so that `functional_call` swaps its weights for the merged ones."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        from alignkit.merge.scoring import summed_logps

        return summed_logps(self.model, batch)


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
    epsilon: float = 0.0,
    reg: float = 0.0,
    seed: int = 0,
    on_step: Callable[[dict], None] | None = None,
) -> HMAResult:
    """`steps` Adam steps on s (see the module docstring), batches in a seeded shuffled cycle.
    `model` is a plain causal LM of the inputs' architecture (its own weights stay as they are)."""
    from torch.func import functional_call

    if steps < 1 or not batches:
        raise ValueError("HMA optimisation needs at least one step and one batch")
    device = next(model.parameters()).device
    theta_b = {n: theta_b[n].to(device) for n in groups}
    delta = {n: theta_a[n].to(device) - theta_b[n] for n in groups}
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
        loss = nll + reg * (ratios - mean_ratio).abs().sum()
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
