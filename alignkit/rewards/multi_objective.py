"""ArmoRM: multi-objective reward model with prompt-conditioned gating (Wang et al. 2024,
"Interpretable Preferences via Multi-Objective Reward Modeling and Mixture-of-Experts";
ALGORITHMS.md §1.6; reference scripts `armo-rm/stage-1_train.py`, `stage-2_train.py`).

With a FROZEN backbone and e(x, y) its last-token hidden state:

1. Attribute heads: r_i(x, y) = w_i^T e(x, y), one ridge regression per rating column, no
   intercept, alpha_i picked on a 20% validation split from 1e-4..1e4 (rows with a missing
   label skipped), then refit on every labelled row with that alpha (our choice).
2. Verbosity de-correlation: r'_i = r_i - lambda_i r_v, lambda_i the smallest grid value in
   0..0.95 with Spearman(r'_i, r_v) <= 0.03 on a reference set (0.95 when none reaches it);
   the verbosity attribute itself is zeroed (lambda_v = 1).
3. Gating: g(x) = softmax(MLP(e(x)) / T) on the PROMPT embedding; R = beta sum_i g_i(x) r'_i.
   Pitfall of the reference script avoided here: it builds the penalty matrix but gates raw
   rewards; `GatingNetwork` is always fed the PENALISED rewards.

The fits below are closed-form statistics on precomputed features; the gradient training of
the gate lives in `alignkit.training.offline.reward`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from alignkit.models import last_token_index, position_ids_from_mask
from alignkit.models.heads import _HEAD_NAMES
from alignkit.rewards.scorer import RewardModelScorer

ALPHA_GRID = tuple(10.0**p for p in range(-4, 5))
LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # 0.00 .. 0.95


def ridge_fit(features: np.ndarray, targets: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge regression without intercept: w = (X^T X + alpha I)^-1 X^T y.

    Shapes: features (N, H), targets (N,) -> w (H,), float64.
    Worked example: X = [[1], [2]], y = [1, 2], alpha = 1: w = 5 / (5 + 1) = 0.8333.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    gram = x.T @ x + alpha * np.eye(x.shape[1])
    return np.linalg.solve(gram, x.T @ y)


def select_ridge_alpha(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    alphas: tuple[float, ...] = ALPHA_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, float, float]:
    """Pick alpha by validation MSE, refit on all labelled rows: (w (H,), alpha, val_mse).

    Rows whose target is NaN are skipped. The split is a seeded permutation (at least one
    validation row).
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    labelled = ~np.isnan(y)
    x, y = x[labelled], y[labelled]
    if len(y) < 2:
        raise ValueError(f"need at least 2 labelled rows to fit a ridge head; got {len(y)}")
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = max(1, int(round(val_fraction * len(y))))
    val, train = order[:n_val], order[n_val:]
    best_alpha, best_mse = alphas[0], float("inf")
    for alpha in alphas:
        w = ridge_fit(x[train], y[train], alpha)
        mse = float(np.mean((x[val] @ w - y[val]) ** 2))
        if mse < best_mse:
            best_alpha, best_mse = alpha, mse
    return ridge_fit(x, y, best_alpha), best_alpha, best_mse


def fit_attribute_heads(
    features: np.ndarray, labels: np.ndarray, **kwargs: Any
) -> tuple[np.ndarray, list[float], list[float]]:
    """One ridge head per attribute column: (W (K, H), alphas [K], val_mse [K]).

    labels (N, K) with NaN where an attribute is unrated; kwargs go to `select_ridge_alpha`.
    """
    weights, alphas, errors = [], [], []
    for k in range(labels.shape[1]):
        w, alpha, mse = select_ridge_alpha(features, labels[:, k], **kwargs)
        weights.append(w)
        alphas.append(alpha)
        errors.append(mse)
    return np.stack(weights), alphas, errors


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    uniques, inverse = np.unique(values, return_inverse=True)
    if len(uniques) < len(values):
        sums = np.bincount(inverse, weights=ranks)
        counts = np.bincount(inverse)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); 0 if either is constant.

    Worked example: a = (1, 2, 3), b = (1, 3, 2): ranks (0, 1, 2) vs (0, 2, 1) -> 0.5.
    """
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def verbosity_penalties(
    rewards: np.ndarray,
    verbosity_index: int,
    *,
    grid: tuple[float, ...] = LAMBDA_GRID,
    threshold: float = 0.03,
) -> np.ndarray:
    """lambda_i = min{lambda in grid : Spearman(r_i - lambda r_v, r_v) <= threshold} (ArmoRM).

    rewards (N, K) are attribute rewards on a reference set. Attributes that never reach the
    threshold get the largest grid value; the verbosity attribute gets 1 (zeroed).
    Returns lambda (K,).
    """
    verbosity = rewards[:, verbosity_index]
    penalties = np.zeros(rewards.shape[1])
    for i in range(rewards.shape[1]):
        if i == verbosity_index:
            penalties[i] = 1.0
            continue
        penalties[i] = grid[-1]
        for lam in grid:
            if spearman(rewards[:, i] - lam * verbosity, verbosity) <= threshold:
                penalties[i] = lam
                break
    return penalties


def penalize(rewards: Tensor, penalties: Tensor, verbosity_index: int | None) -> Tensor:
    """r'_i = r_i - lambda_i r_v. Shapes: rewards (B, K), penalties (K,) -> (B, K).

    `verbosity_index` None (no verbosity attribute) leaves the rewards unchanged.
    """
    if verbosity_index is None or verbosity_index < 0:
        return rewards
    return rewards - penalties.to(rewards) * rewards[:, verbosity_index : verbosity_index + 1]


class GatingNetwork(nn.Module):
    """Prompt-conditioned gate: R = beta * sum_i softmax(MLP(e_x) / T)_i r'_i (ArmoRM stage 2).

    MLP: `hidden_layers` x (Linear(width), ReLU, Dropout), then Linear(K). ArmoRM: 3 x 1024,
    dropout 0.2, T = 10, beta learned (initialised to 1 here).
    """

    def __init__(
        self,
        input_dim: int,
        num_attributes: int,
        *,
        hidden_layers: int = 3,
        width: int = 1024,
        dropout: float = 0.2,
        temperature: float = 10.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = input_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(size, width), nn.ReLU(), nn.Dropout(dropout)]
            size = width
        layers.append(nn.Linear(size, num_attributes))
        self.mlp = nn.Sequential(*layers)
        self.temperature = temperature
        self.beta = nn.Parameter(torch.ones(()))
        self.config = {
            "input_dim": input_dim,
            "num_attributes": num_attributes,
            "hidden_layers": hidden_layers,
            "width": width,
            "dropout": dropout,
            "temperature": temperature,
        }

    def gates(self, prompt_embeddings: Tensor) -> Tensor:
        """(B, H) -> (B, K) softmax weights."""
        return torch.softmax(self.mlp(prompt_embeddings) / self.temperature, dim=-1)

    def forward(self, prompt_embeddings: Tensor, penalized_rewards: Tensor) -> Tensor:
        """(B, H), (B, K) -> (B,) gated reward."""
        return self.beta * (self.gates(prompt_embeddings) * penalized_rewards).sum(dim=-1)


def score_head(model: nn.Module) -> nn.Module:
    """The classification head of a sequence classifier (`score` or `classifier`)."""
    return next(getattr(model, name) for name in _HEAD_NAMES if hasattr(model, name))


@torch.no_grad()
def last_token_embeddings(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden state at each row's last real token of a sequence classifier's backbone:
    (B, T) -> (B, H) float32 (padding side does not matter)."""
    backbone = model.base_model
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask).to(hidden.device)].float()


def _embed(scorer: RewardModelScorer, sequences: list[list[int]]) -> Tensor:
    device = next(scorer.model.parameters()).device
    parts = []
    for start in range(0, len(sequences), scorer.batch_size):
        input_ids, mask = scorer._pad(sequences[start : start + scorer.batch_size], device)
        parts.append(last_token_embeddings(scorer.model, input_ids, mask).cpu())
    return torch.cat(parts) if parts else torch.zeros(0)


def embed_texts(
    scorer: RewardModelScorer,
    prompts: list[Any],
    completions: list[Any],
    *,
    with_prompt: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(e(x, y) (N, H), e(x) (N, H) or None): last-token embeddings of prompt + completion and,
    with `with_prompt`, of the prompt alone; tokenised exactly as the RM trainer does."""
    from alignkit.data import RowTable, tokenize_sft

    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    examples, _ = tokenize_sft(
        RowTable(rows),
        scorer.tokenizer,
        max_length=scorer.max_length,
        max_prompt_length=scorer.max_prompt_length,
        chat=bool(scorer.chat_template),
    )
    responses = _embed(scorer, [e.prompt_ids + e.completion_ids for e in examples])
    prompt_only = _embed(scorer, [e.prompt_ids for e in examples]) if with_prompt else None
    return responses, prompt_only


@dataclass
class MultiObjectiveOutput:
    attributes: Tensor
    """(B, K) raw attribute rewards r_i."""
    penalized: Tensor
    """(B, K) verbosity-penalised rewards r'_i."""
    gates: Tensor
    """(B, K) gating weights g_i(x)."""
    reward: Tensor
    """(B,) gated scalar R."""


class MultiObjectiveScorer:
    """A saved ArmoRM-style model (`alignkit train rm_multi`) as a reward function.

    The directory holds the backbone as a sequence classifier whose K outputs are the ridge
    heads (so `AutoModelForSequenceClassification` alone gives the raw attribute vector),
    `gating.safetensors` and `multi_objective.json` (attributes, verbosity attribute,
    penalties, gate config). `scores(...)` returns every stage; `__call__` the scalar.
    """

    def __init__(self, directory: str | Path, **scorer_kwargs: Any) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        manifest = json.loads((directory / "multi_objective.json").read_text())
        self.attributes = list(manifest["attributes"])
        self.verbosity_index = int(manifest["verbosity_index"])
        self.penalties = torch.tensor(manifest["penalties"], dtype=torch.float32)
        self.scorer = RewardModelScorer(directory, **scorer_kwargs)
        self.gate = GatingNetwork(**manifest["gating"])
        self.gate.load_state_dict(load_file(directory / "gating.safetensors"))
        self.gate.eval()
        self.__name__ = f"MultiObjectiveScorer({directory})"

    @torch.no_grad()
    def scores(self, prompts: list[Any], completions: list[Any]) -> MultiObjectiveOutput:
        response_emb, prompt_emb = embed_texts(
            self.scorer, list(prompts), list(completions), with_prompt=True
        )
        head = score_head(self.scorer.model)
        attributes = head(response_emb.to(head.weight)).float().cpu()  # (B, K)
        penalized = penalize(attributes, self.penalties, self.verbosity_index)
        gates = self.gate.gates(prompt_emb)
        reward = self.gate.beta * (gates * penalized).sum(dim=-1)
        return MultiObjectiveOutput(attributes, penalized, gates, reward)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        return self.scores(prompts, completions).reward
