"""Model-space methods as pure functions over state dicts (name -> tensor).

Every function takes and returns plain `dict[str, Tensor]`s of floating-point tensors with the
same names and shapes (`alignkit.merge.io` checks that before calling), computes in float32 and
never modifies its inputs. Layer structure comes in as `layer_of: name -> block index or None`
(None: outside the transformer blocks), worked out from the model by `io.layer_index_map`.

- `interpolate`        θ = α θ_A + (1 − α) θ_B                       (Lin et al. 2024, §4.1)
- `weighted_average`   θ = Σ_i w_i θ_i ; `uniform_soup` w_i = 1/N      (Wortsman et al. 2022)
- `greedy_soup`        add ingredients in order of held-out score while the soup's score holds
- `task_arithmetic`    θ = θ_pre + Σ_i λ_i (θ_i − θ_pre)                 (Ilharco et al. 2023)
- `lines`              θ = θ_pre + λ(ℓ) τ, λ(ℓ) = α + β ℓ/(L − 1)         (Wang et al. 2024)
- `hma_ratios`, `hma_merge`  per-block α_k = ᾱ K (σ(s_k)+ε) / Σ_j (σ(s_j)+ε) (Lin et al. 2024)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

StateDict = dict[str, Tensor]
log = logging.getLogger("alignkit")


def _f32(tensor: Tensor) -> Tensor:
    return tensor.detach().to(torch.float32)


# --------------------------------------------------------------------------- averaging


def interpolate(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], alpha: float) -> StateDict:
    """θ = α θ_A + (1 − α) θ_B, per parameter.

    The alignment-tax paper's convention (Lin et al. 2024, repo avalonstrel/Mitigating-the-
    Alignment-Tax-of-RLHF): α weights model A, the pre-RLHF (base) model, so α = 0 gives B (the
    RLHF model) and α = 1 gives A.
    """
    return {name: alpha * _f32(theta_a[name]) + (1.0 - alpha) * _f32(theta_b[name]) for name in theta_a}


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """θ = Σ_i w_i θ_i (the weights are used as given: pass ones that sum to 1 for an average)."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"weighted_average needs one weight per state dict, got {len(weights)} for {len(states)}")
    out: StateDict = {}
    for name in states[0]:
        total = weights[0] * _f32(states[0][name])
        for weight, state in zip(weights[1:], states[1:], strict=True):
            total = total + weight * _f32(state[name])
        out[name] = total
    return out


def uniform_soup(states: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Uniform soup (Wortsman et al. 2022): θ = (1/N) Σ_i θ_i."""
    return weighted_average(states, [1.0 / len(states)] * len(states))


@dataclass
class SoupDecision:
    """One step of the greedy soup: the candidate, its own score, the score of the soup with it
    and whether it joined (`soup_score` is the soup's score after the decision)."""

    name: str
    ingredient_score: float
    candidate_score: float
    accepted: bool
    soup_score: float

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def greedy_soup(
    states: Sequence[Mapping[str, Tensor]],
    names: Sequence[str],
    score: Callable[[Mapping[str, Tensor]], float],
    *,
    progress: Callable[[], None] | None = None,
) -> tuple[StateDict, list[SoupDecision], list[float]]:
    """Greedy soup (Wortsman et al. 2022, Algorithm 1): sort the models by held-out score, best
    first (ties keep the given order); the soup starts as the best model; each next model joins
    iff score(uniform_soup(soup ∪ {θ_i})) >= score(soup) (the soup's score does not drop).

    `score(state_dict) -> float` is higher-is-better. Returns (soup state dict, one decision per
    model in sorted order (the first is always accepted), every model's own score in input order).
    """
    if len(states) < 2:
        raise ValueError(f"greedy_soup needs at least 2 models, got {len(states)}")
    own = []
    for state in states:
        own.append(float(score(state)))
        if progress is not None:
            progress()
    order = sorted(range(len(states)), key=lambda i: -own[i])
    first = order[0]
    ingredients = [states[first]]
    current = own[first]
    decisions = [SoupDecision(names[first], own[first], own[first], True, current)]
    for index in order[1:]:
        candidate = uniform_soup([*ingredients, states[index]])
        candidate_score = float(score(candidate))
        accepted = candidate_score >= current
        if accepted:
            ingredients.append(states[index])
            current = candidate_score
        decisions.append(SoupDecision(names[index], own[index], candidate_score, accepted, current))
        log.info("greedy soup: %s (own score %.6g): soup with it scores %.6g -> %s", names[index],
                 own[index], candidate_score, "accepted" if accepted else "rejected")
        if progress is not None:
            progress()
    return uniform_soup(ingredients), decisions, own


# --------------------------------------------------------------------------- task vectors


def task_vector(theta_pre: Mapping[str, Tensor], theta_ft: Mapping[str, Tensor]) -> StateDict:
    """τ = θ_ft − θ_pre."""
    return {name: _f32(theta_ft[name]) - _f32(theta_pre[name]) for name in theta_pre}


def task_arithmetic(
    theta_pre: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], lambdas: Sequence[float]
) -> StateDict:
    """Task arithmetic (Ilharco et al. 2023): θ = θ_pre + Σ_i λ_i τ_i, τ_i = θ_i − θ_pre."""
    if len(states) != len(lambdas):
        raise ValueError(f"task_arithmetic needs one lambda per model, got {len(lambdas)} for {len(states)}")
    out = {name: _f32(tensor) for name, tensor in theta_pre.items()}
    for lam, state in zip(lambdas, states, strict=True):
        for name in out:
            out[name] = out[name] + lam * (_f32(state[name]) - _f32(theta_pre[name]))
    return out


def lines_scales(
    layer_of: Mapping[str, int | None], num_blocks: int, alpha: float, beta: float
) -> dict[str, float]:
    """LiNeS per-parameter scale (Wang et al. 2024; official code wang-kee/LiNeS
    `src/eval/eval.py::LiNeS_scaling`, ALGORITHMS-addendum §10):

        λ(b) = α + β · b / (L − 1)   for a parameter of block b = 0..L−1 (first α, last α + β),
        λ    = α                     for every parameter outside the blocks (embeddings, final
                                     norm, output head).
    """
    if num_blocks < 2:
        raise ValueError(f"LiNeS scales across the transformer blocks: it needs at least 2, the model has {num_blocks}")
    scales = {}
    for name, block in layer_of.items():
        scales[name] = alpha if block is None else alpha + beta * block / (num_blocks - 1)
    return scales


def lines(
    theta_pre: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    layer_of: Mapping[str, int | None],
    num_blocks: int,
    alpha: float,
    beta: float,
) -> StateDict:
    """LiNeS edit: θ = θ_pre + λ(name) · τ(name) with `lines_scales` (the scaled task vector is
    applied with coefficient 1, as in the official code)."""
    scales = lines_scales(layer_of, num_blocks, alpha, beta)
    return {name: _f32(theta_pre[name]) + scales[name] * _f32(tau[name]) for name in theta_pre}


def l1_norm(state: Mapping[str, Tensor]) -> float:
    """Σ |x| over every entry of every tensor (float64 accumulation)."""
    return float(sum(_f32(t).abs().double().sum() for t in state.values()))


def lines_multi_task_alpha(taus: Sequence[Mapping[str, Tensor]], merged_tau: Mapping[str, Tensor]) -> float:
    """Multi-task LiNeS's fixed α = (‖Σ_i τ_i‖₁ / ‖τ_MTL‖₁) · (1/T) (official code `aggregation.py`
    norms, `eval.py::evaluate`); with Task Arithmetic's τ_MTL = Σ_i τ_i it is 1/T."""
    summed = {name: sum(_f32(t[name]) for t in taus) for name in taus[0]}
    merged_norm = l1_norm(merged_tau)
    if merged_norm == 0.0:
        raise ValueError("every task vector is zero (the fine-tuned models equal the base): LiNeS has nothing to scale")
    return l1_norm(summed) / merged_norm / len(taus)


# --------------------------------------------------------------------------- HMA


def layer_blocks(num_layers: int, num_blocks: int | None = None, pivots: Sequence[int] | None = None) -> list[int]:
    """Block index of each transformer layer 0..L−1.

    pivots (the reference's `split|10#20|...` save names, `weight_interpolation.py`): layer i
    belongs to block #{p : i > p}, so "10#20" makes blocks 0–10, 11–20, 21–end. Without pivots,
    K equal blocks as the reference's `block{K}` mask level (`mask_trainer.py`): size ⌊L/K⌋,
    block of i = min(⌊i / size⌋, K − 1) (the last block takes the remainder).
    """
    if pivots:
        if list(pivots) != sorted(set(pivots)) or pivots[0] < 0 or pivots[-1] >= num_layers - 1:
            raise ValueError(f"pivots must increase strictly within 0..{num_layers - 2} (the model has "
                             f"{num_layers} layers), got {','.join(map(str, pivots))}")
        return [sum(layer > p for p in pivots) for layer in range(num_layers)]
    if num_blocks is None or not 1 <= num_blocks <= num_layers:
        raise ValueError(f"the number of blocks must be between 1 and the {num_layers} layers, got {num_blocks}")
    size = num_layers // num_blocks
    return [min(layer // size, num_blocks - 1) for layer in range(num_layers)]


def hma_groups(names: Sequence[str], layer_of: Mapping[str, int | None], blocks: Sequence[int]) -> dict[str, int | None]:
    """Which ratio each parameter takes: its layer's block k (an index into the ratios), or
    None for the mean ratio ᾱ.

    As the reference's split merge (`weight_interpolation.py::merge_split`): parameters of
    layer i take α of its block; the parameters before the first layer (the input embeddings,
    in state-dict order) take the first block's α; those after the last layer (final norm,
    output head) take ᾱ. A head tied to the input embeddings is one tensor with them (io drops
    the alias), so it takes the first block's α too.
    """
    groups: dict[str, int | None] = {}
    seen_layer = False
    for name in names:
        layer = layer_of[name]
        if layer is not None:
            seen_layer = True
            groups[name] = blocks[layer]
        else:
            groups[name] = None if seen_layer else 0
    return groups


def hma_ratios(scores: Tensor, mean_ratio: float, epsilon: float = 0.0) -> Tensor:
    """α_k = ᾱ · K · (σ(s_k) + ε) / Σ_j (σ(s_j) + ε), (K,) -> (K,); differentiable in s.

    The mean of the ratios is ᾱ whatever s is (Lin et al. 2024, HMA; reference
    `mask_trainer.py::MaskNormalizedSigmoidLinear`, whose `epsilon` flattens the variation:
    0 in the paper's formula, 0.2 in the reference's run script).
    """
    weights = torch.sigmoid(scores) + epsilon
    return mean_ratio * scores.shape[0] * weights / weights.sum()


def hma_merge(
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    groups: Mapping[str, int | None],
    ratios: Sequence[float] | Tensor,
    mean_ratio: float,
) -> StateDict:
    """θ(name) = α_g θ_A(name) + (1 − α_g) θ_B(name), α_g = ratios[g] for a block g, ᾱ for None."""
    out = {}
    for name, group in groups.items():
        alpha = mean_ratio if group is None else ratios[group]
        out[name] = alpha * _f32(theta_a[name]) + (1.0 - alpha) * _f32(theta_b[name])
    return out


def initial_scores(num_blocks: int, mean_ratio: float) -> Tensor:
    """s_k = logit(ᾱ) for every block (the reference's initialisation; equal scores give
    α_k = ᾱ exactly), 0 when ᾱ is outside (0, 1)."""
    value = math.log(mean_ratio / (1.0 - mean_ratio)) if 0.0 < mean_ratio < 1.0 else 0.0
    return torch.full((num_blocks,), value, dtype=torch.float32)
