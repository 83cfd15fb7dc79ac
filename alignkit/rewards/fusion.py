"""RewardFusion (Shen et al. 2023, "The Trickle-down Impact of Reward (In-)consistency on RLHF",
arXiv 2309.16155): an inference-time fix for reward inconsistency. The reward of a text is
averaged with the rewards of its close neighbours among the RM's training texts, weighted by
similarity, so that two lexically similar inputs cannot get wildly different rewards.

Procedure (ALGORITHMS-addendum.md §5, checked against the official code
shadowkiller33/Contrast-Instruction `code/reward_fusion.py`):

1. Index: every training row's (prompt, preferred response) as one text, embedded once.
2. For a query text s = (prompt, response): retrieve up to k = 5 index texts s_1..s_m with
   cosine similarity sim_i >= 0.9 (most similar first), and add s itself with sim_0 = 1.
3. Weights w_i = sim_i / sum_j sim_j (i = 0..m); fused reward r_fused(s) = sum_i w_i r(s_i),
   every r(s_i) scored by the same reward model (neighbour scores are cached).

Deviations, on purpose:
- Sentence encoder: the packaged all-MiniLM-L6-v2 (mean-pooled, unit-norm;
  `alignkit.eval.embeddings.MiniLMEmbedder`) instead of SimCSE RoBERTa-base, which is not
  shipped. Any object with `encode(texts) -> (N, D)` unit-norm rows can replace it.
- De-duplication done properly (the official code compares the second text's candidates
  against the search results instead of the kept list, so duplicates can count twice):
  index texts are unique, and an index text equal to the query is not counted as a neighbour
  (the query already enters with similarity 1).
- Text of a row: `prompt + "\\n\\n" + response` (message lists joined by content); the
  official code uses its task's RM prompt format, which alignkit's RM input does not expose.

Worked example: query score 2, neighbours (sim 0.95, score 0) and (sim 0.9, score 4),
k = 5, min_sim = 0.9: weights (1, 0.95, 0.9) / 2.85 -> r_fused = (2 + 0 + 3.6) / 2.85 = 1.9649.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.rewards.base import call_reward
from alignkit.rewards.rules import completion_text

FUSION_OPTIONS = {"fusion_index": str, "fusion_k": int, "fusion_min_sim": float}


def fusion_text(prompt: Any, response: Any) -> str:
    """The text embedded for retrieval: prompt, a blank line, response."""
    return f"{completion_text(prompt)}\n\n{completion_text(response)}"


def fusion_weights(neighbour_similarities: Sequence[float]) -> list[float]:
    """Normalised fusion weights [w_0 (the query itself), w_1, ...]: sim_0 = 1 is prepended and
    w_i = sim_i / sum_j sim_j. (0.95, 0.9) -> (1, 0.95, 0.9) / 2.85."""
    similarities = [1.0, *map(float, neighbour_similarities)]
    total = sum(similarities)
    return [s / total for s in similarities]


def select_neighbours(
    similarities: Tensor, k: int, min_similarity: float, exclude: int | None = None
) -> list[tuple[int, float]]:
    """Up to `k` (index, similarity) with similarity >= min_similarity, most similar first
    (equal similarities by lower index among the top k + 1 that `torch.topk` returns);
    `exclude` (the query's own index entry) is never chosen. Shape: similarities (N,)."""
    threshold = torch.tensor(min_similarity, dtype=similarities.dtype).item()  # 0.9 as the tensor stores it
    top = similarities.topk(min(k + 1, similarities.shape[0]))  # k + 1: one may be excluded
    candidates = sorted(zip(top.values.tolist(), top.indices.tolist(), strict=True), key=lambda c: (-c[0], c[1]))
    chosen = []
    for value, i in candidates:
        if len(chosen) == k or value < threshold:
            break
        if i != exclude:
            chosen.append((i, value))
    return chosen


class RewardFusion:
    """A reward function whose score of (prompt, response) is the similarity-weighted mean of
    its own reward and its neighbours' among `index_rows` (see the module docstring).

    `reward`: any reward function `(prompts, completions, **columns) -> (B,)`.
    `index_rows`: rows with `prompt` and `chosen` (pairwise) or `completion`; the preferred
    response is what is indexed. `embedder`: an object with `encode(texts) -> (N, D)` unit
    rows (default all-MiniLM-L6-v2). `neighbour_counts` collects the number of neighbours
    used for every row scored so far.
    """

    def __init__(
        self,
        reward: Callable[..., Any],
        index_rows: Sequence[dict[str, Any]],
        *,
        k: int = 5,
        min_similarity: float = 0.9,
        embedder: Any = None,
        source: str = "fusion index",
    ) -> None:
        if k < 1:
            raise ValueError(f"fusion_k must be >= 1, got {k}")
        if not -1.0 <= min_similarity <= 1.0:
            raise ValueError(f"fusion_min_sim is a cosine similarity in [-1, 1], got {min_similarity}")
        self.reward, self.k, self.min_similarity = reward, k, min_similarity
        self.index_prompts, self.index_responses, texts = [], [], {}
        for number, row in enumerate(index_rows, start=1):
            response = row.get("chosen", row.get("completion"))
            if row.get("prompt") is None or response is None:
                raise ValueError(
                    f"{source}, row {number}: a fusion index row needs 'prompt' and 'chosen' "
                    f"(or 'completion'); it has {sorted(row)}"
                )
            text = fusion_text(row["prompt"], response)
            if text not in texts:  # unique index texts: a duplicate would count twice
                texts[text] = len(texts)
                self.index_prompts.append(row["prompt"])
                self.index_responses.append(response)
        if not texts:
            raise ValueError(f"{source}: the fusion index has no rows")
        self.index_texts = list(texts)
        self._position = texts
        if embedder is None:
            from alignkit.eval.embeddings import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        self.embedder = embedder
        self.index_embeddings = embedder.encode(self.index_texts).float()  # (N, D)
        self._index_scores: dict[int, float] = {}
        self.neighbour_counts: list[int] = []
        self.alignkit_reward_name = f"fusion({getattr(reward, 'alignkit_reward_name', 'reward')})"

    def _score(self, prompts: list[Any], completions: list[Any], columns: dict[str, Any]) -> Tensor:
        scores = call_reward(self.reward, prompts, completions, **columns)
        if scores.ndim != 1:
            raise ValueError(f"reward fusion averages one score per row; the reward gives shape {tuple(scores.shape)}")
        return scores.double()

    def _neighbour_scores(self, indices: set[int]) -> None:
        missing = sorted(i for i in indices if i not in self._index_scores)
        if missing:
            scores = self._score([self.index_prompts[i] for i in missing],
                                 [self.index_responses[i] for i in missing], {})
            self._index_scores.update(zip(missing, scores.tolist(), strict=True))

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        own = self._score(list(prompts), list(completions), columns)  # (B,)
        texts = [fusion_text(p, c) for p, c in zip(prompts, completions, strict=True)]
        similarities = self.embedder.encode(texts).float() @ self.index_embeddings.T  # (B, N)
        neighbours = [
            select_neighbours(similarities[b], self.k, self.min_similarity, self._position.get(text))
            for b, text in enumerate(texts)
        ]
        self._neighbour_scores({i for row in neighbours for i, _ in row})
        fused = []
        for own_score, row in zip(own.tolist(), neighbours, strict=True):
            weights = fusion_weights([similarity for _, similarity in row])
            scores = [own_score, *(self._index_scores[i] for i, _ in row)]
            fused.append(sum(w * s for w, s in zip(weights, scores, strict=True)))
        self.neighbour_counts.extend(len(row) for row in neighbours)
        return torch.tensor(fused, dtype=torch.float32)


def parse_fusion_options(spec: str, options_text: str) -> dict[str, Any]:
    """`fusion_index=TRAIN.jsonl,fusion_k=5,fusion_min_sim=0.9` -> typed dict; a one-line error
    naming the spec for an unknown key, a missing value or a bad number."""
    options: dict[str, Any] = {}
    for item in options_text.split(","):
        key, sep, value = item.strip().partition("=")
        if key not in FUSION_OPTIONS or not sep or not value:
            raise ValueError(
                f"reward spec {spec!r}: option {item.strip()!r} is not one of "
                f"{', '.join(k + '=...' for k in FUSION_OPTIONS)}"
            )
        try:
            options[key] = FUSION_OPTIONS[key](value)
        except ValueError:
            raise ValueError(
                f"reward spec {spec!r}: {key} must be {FUSION_OPTIONS[key].__name__}, got {value!r}"
            ) from None
    if "fusion_index" not in options:
        raise ValueError(f"reward spec {spec!r}: fusion options need fusion_index=TRAIN.jsonl")
    return options


def load_fusion_index(source: str) -> list[dict[str, Any]]:
    """The rows of a fusion index file (pairwise, or prompt + completion); a row without a prompt
    or a preferred response is an error naming the file and editor row."""
    from alignkit.data import load_rows, split_implicit_prompt

    table = load_rows(source)
    rows = [split_implicit_prompt(row) for row in table.rows]
    for i, row in enumerate(rows):
        if row.get("prompt") is None or row.get("chosen", row.get("completion")) is None:
            raise table.error(i, f"a fusion index row needs 'prompt' and 'chosen' (or 'completion'); it has {sorted(row)}")
    return rows


def fused_reward(reward: Callable[..., Any], options: dict[str, Any], embedder: Any = None) -> RewardFusion:
    """`RewardFusion` over the rows of `options["fusion_index"]` (a data file or directory)."""
    source = options["fusion_index"]
    return RewardFusion(reward, load_fusion_index(source), k=options.get("fusion_k", 5),
                        min_similarity=options.get("fusion_min_sim", 0.9), embedder=embedder, source=source)


__all__ = ["RewardFusion", "fused_reward", "load_fusion_index", "fusion_text", "fusion_weights", "parse_fusion_options",
           "select_neighbours"]
