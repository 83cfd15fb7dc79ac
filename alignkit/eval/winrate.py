"""Pairwise win rates judged in both orders, and the length-controlled win rate.

A judge answers P(a beats b | x) for a batch of (prompt, a, b) triples (`PairwiseJudge`):
a trained preference model (`alignkit.rewards.preference.PreferenceJudge`, or anything with
`prob(prompts, a, b)`), or a reward function / reward model wrapped by `RewardJudge`, which
compares the two scores. This module knows nothing of `alignkit.rewards`: a caller that wants
failing rows isolated passes its scorer (`RewardJudge(reward, score=...)`, as `alignkit.lab`
does with `score_safely`).

Win rate of A against B (ALGORITHMS.md §5.4): each pair is judged in both orders and each
order gives a verdict v = 1 (first wins, p > 1/2), 1/2 (tie, p = 1/2) or 0, so a judge that
always prefers the first position scores exactly 1/2:

    outcome_i = (v(p(a_i, b_i)) + 1 - v(p(b_i, a_i))) / 2  in {0, 1/4, 1/2, 3/4, 1}
    win_rate  = mean_i outcome_i                           (ties count half)

Length-controlled win rate, in the spirit of AlpacaEval 2's LC win rate (Dubois et al. 2024,
"Length-Controlled AlpacaEval"): regress the per-pair outcome on the (squashed, scaled)
length difference and read the win rate the regression implies at zero difference:

    x_i = tanh((len(a_i) - len(b_i)) / s),  s = std of the length differences
    logistic: outcome_i ~ sigma(theta_0 + theta_1 x_i)  ->  LC = sigma(theta_0)
    linear:   outcome_i ~ theta_0 + theta_1 x_i          ->  LC = clip(theta_0, 0, 1)

The logistic fit maximises the Bernoulli log-likelihood with fractional targets (Newton /
IRLS) with an L2 penalty `l2` on theta_1 only, so a judge that perfectly separates by length
still gives a finite slope. AlpacaEval's GLM also has per-instruction difficulty terms and is
fitted across many models; with one model pair we keep only the length term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from alignkit.eval.stats import bootstrap_ci


@runtime_checkable
class PairwiseJudge(Protocol):
    """`prob(prompts, responses_a, responses_b) -> (B,)`: P(a beats b), in [0, 1]."""

    def prob(
        self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]
    ) -> Tensor: ...


def call_reward(reward: Callable[..., Any], prompts: list[str], responses: list[str]) -> Tensor:
    """`reward(prompts, responses)` as a float32 tensor (B,) or (B, K). A plain call: an
    exception propagates as is; a wrong length or a NaN/inf score raises ValueError (a
    non-finite score must not pass for a tie)."""
    values = reward(prompts, responses)
    if isinstance(values, Tensor):
        scores = values.detach().to(device="cpu", dtype=torch.float32)
    else:
        scores = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)
    scores = scores.reshape(1) if scores.ndim == 0 else scores
    if scores.ndim > 2 or scores.shape[0] != len(responses):
        raise ValueError(
            f"reward returned shape {tuple(scores.shape)} for {len(responses)} responses"
        )
    bad = torch.nonzero(~torch.isfinite(scores.reshape(len(responses), -1)).all(dim=1)).flatten()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"reward gave a non-finite score to row {row} ({prompts[row][:60]!r})")
    return scores


class RewardJudge:
    """A reward function as a judge: prob = 1 if r(a) - r(b) > tol, 1/2 if |r(a) - r(b)| <= tol,
    else 0. Scores are cached by (prompt, response), so judging both orders scores once.

    `score(reward, prompts, responses) -> (B,) or (B, K)` computes the scores (the first
    objective is compared); default `call_reward`, a plain call. Pass e.g.
    `lambda fn, p, r: score_safely(fn, p, r)[0]` to isolate failing rows.
    """

    def __init__(
        self,
        reward: Callable[..., Any],
        tie_tolerance: float = 0.0,
        *,
        score: Callable[[Callable[..., Any], list[str], list[str]], Any] | None = None,
    ) -> None:
        self.reward = reward
        self.tie_tolerance = tie_tolerance
        self.score = score if score is not None else call_reward
        self._cache: dict[tuple[str, str], float] = {}

    def scores(self, prompts: list[Any], responses: list[Any]) -> Tensor:
        keys = [(str(p), str(r)) for p, r in zip(prompts, responses, strict=True)]
        todo = [key for key in dict.fromkeys(keys) if key not in self._cache]
        if todo:
            values = torch.as_tensor(
                self.score(self.reward, [k[0] for k in todo], [k[1] for k in todo])
            )
            self._cache.update(zip(todo, values.reshape(len(todo), -1)[:, 0].tolist(), strict=True))
        return torch.tensor([self._cache[key] for key in keys], dtype=torch.float64)

    def prob(self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]) -> Tensor:
        both = self.scores(list(prompts) * 2, list(responses_a) + list(responses_b))  # one call
        diff = both[: len(prompts)] - both[len(prompts) :]
        out = torch.full_like(diff, 0.5)
        out[diff > self.tie_tolerance] = 1.0
        out[diff < -self.tie_tolerance] = 0.0
        return out


def as_judge(judge: Any) -> PairwiseJudge:
    """A `PairwiseJudge` from a preference model (has `prob`) or a reward callable."""
    if hasattr(judge, "prob"):
        return judge
    if callable(judge):
        return RewardJudge(judge)
    raise TypeError(
        f"a judge needs prob(prompts, a, b) or must be a reward callable; got {type(judge).__name__}"
    )


def verdicts(prob: np.ndarray) -> np.ndarray:
    """1 where p > 1/2, 1/2 where p == 1/2, 0 where p < 1/2."""
    prob = np.asarray(prob, dtype=np.float64)
    return np.where(prob > 0.5, 1.0, np.where(prob < 0.5, 0.0, 0.5))


def pair_outcomes(prob_ab: np.ndarray, prob_ba: np.ndarray) -> np.ndarray:
    """Per-pair outcome for A from both orders: (v(p_ab) + 1 - v(p_ba)) / 2: (B,)."""
    return 0.5 * (verdicts(prob_ab) + 1.0 - verdicts(prob_ba))


def judged_win_rate(
    judge: Any,
    prompts: list[Any],
    responses_a: list[Any],
    responses_b: list[Any],
    *,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: list[int] | None = None,
) -> dict[str, Any]:
    """Win rate of A against B judged in both orders, with a bootstrap interval.

    Returns {"win_rate", "ci_low", "ci_high", "ties", "first_position_rate",
    "order_consistency", "n", "outcomes"}: `ties` the fraction of pairs with outcome 1/2,
    `first_position_rate` how often the first-shown response won (0.5 = no position bias),
    `order_consistency` the fraction of pairs whose two verdicts agree. `clusters` (e.g. the
    prompt index of each pair) makes the bootstrap resample prompts, not pairs.
    """
    judge = as_judge(judge)
    prob_ab = np.asarray(
        torch.as_tensor(judge.prob(prompts, responses_a, responses_b)).double().cpu()
    )
    prob_ba = np.asarray(
        torch.as_tensor(judge.prob(prompts, responses_b, responses_a)).double().cpu()
    )
    first, second = verdicts(prob_ab), verdicts(prob_ba)
    outcomes = pair_outcomes(prob_ab, prob_ba)
    _, low, high = bootstrap_ci(
        _cluster_means(outcomes, clusters), confidence=confidence, seed=seed
    )
    return {
        "win_rate": float(outcomes.mean()),
        "ci_low": low,
        "ci_high": high,
        "ties": float(np.mean(outcomes == 0.5)),
        "first_position_rate": float(np.mean(np.concatenate([first, second]))),
        "order_consistency": float(np.mean(first == 1.0 - second)),
        "n": int(outcomes.size),
        "outcomes": outcomes.tolist(),
    }


def _cluster_means(values: np.ndarray, clusters: list[int] | None) -> np.ndarray:
    if clusters is None:
        return values
    clusters_array = np.asarray(clusters)
    return np.array([values[clusters_array == c].mean() for c in dict.fromkeys(clusters)])


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def length_controlled_win_rate(
    outcomes: np.ndarray,
    length_a: np.ndarray,
    length_b: np.ndarray,
    *,
    method: str = "logistic",
    l2: float = 1.0,
    max_iter: int = 100,
) -> dict[str, Any]:
    """Win rate at zero length difference (see the module docstring for the model).

    Shapes: outcomes, length_a, length_b (B,) with outcomes in [0, 1]. Returns
    {"lc_win_rate", "intercept", "slope", "length_scale", "method", "raw_win_rate",
    "mean_length_difference"}.
    """
    y = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    delta = np.asarray(length_a, dtype=np.float64).reshape(-1) - np.asarray(
        length_b, dtype=np.float64
    ).reshape(-1)
    if y.shape != delta.shape or y.size == 0:
        raise ValueError(
            f"outcomes and lengths must be non-empty and aligned; got {y.shape}, {delta.shape}"
        )
    if np.any((y < 0) | (y > 1)):
        raise ValueError("outcomes must lie in [0, 1]")
    scale = float(delta.std())
    x = np.tanh(delta / scale) if scale > 0 else np.zeros_like(delta)
    design = np.stack([np.ones_like(x), x], axis=1)  # (B, 2)
    if method == "linear":
        theta = (
            np.linalg.lstsq(design, y, rcond=None)[0] if scale > 0 else np.array([y.mean(), 0.0])
        )
        lc = float(np.clip(theta[0], 0.0, 1.0))
    elif method == "logistic":
        theta = _logistic_fit(design, y, l2, max_iter)
        lc = float(_sigmoid(theta[0]))
    else:
        raise ValueError(f"method must be 'logistic' or 'linear'; got {method!r}")
    return {
        "lc_win_rate": lc,
        "intercept": float(theta[0]),
        "slope": float(theta[1]),
        "length_scale": scale,
        "method": method,
        "raw_win_rate": float(y.mean()),
        "mean_length_difference": float(delta.mean()),
    }


def _logistic_fit(design: np.ndarray, y: np.ndarray, l2: float, max_iter: int) -> np.ndarray:
    """Newton's method on sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - l2/2 theta_1^2.

    All-equal outcomes have no finite maximiser; the intercept is then capped at +-20.
    """
    if np.all(y == y[0]) and y[0] in (0.0, 1.0):
        return np.array([20.0 if y[0] == 1.0 else -20.0, 0.0])
    penalty = np.diag([0.0, l2])
    theta = np.zeros(2)
    for _ in range(max_iter):
        p = _sigmoid(design @ theta)
        gradient = design.T @ (y - p) - penalty @ theta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta = np.clip(theta + step, -20.0, 20.0)
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta
