"""Output diversity as Kirk et al. 2023 measure it ("Understanding the Effects of RLHF on LLM
Generalisation and Diversity"; reference code facebookresearch/rlfh-gen-div,
`rlvsil/diversity/__init__.py::calculate_diversity_metrics`).

Given outputs grouped by prompt, `outputs[i][j]` = sample j for prompt i:

- per-input diversity: the metric on each prompt's own samples, averaged over prompts
  (`mean_per_input_*` in the reference code; it also reports the std over prompts);
- across-input diversity: the metric on ONE sample per prompt, `[outputs[i][0] for i]`,
  pooled (`overall_single_output_*`): how different the answers to different inputs are.

Metrics on a set of texts (word n-grams: lowercased whitespace tokens, see `stats.ngrams`):
- distinct-n = unique n-grams / total n-grams (Li et al. 2016), n = 1..4, and their mean over
  n = 1..5 as Kirk et al. report it ("averaged_distinct_ngrams");
- EAD = mean over n = 1..5 of N_unique / (V (1 - ((V - 1) / V)^C)), V = 50257 (Liu et al.
  2022; `stats.ead`);
- embedding diversity = 1 - mean pairwise cosine similarity of sentence embeddings over all
  unordered pairs. Kirk et al. use `bert-large-nli-stsb-mean-tokens`; we use the embedded
  all-MiniLM-L6-v2 (same mean-pooled sentence-transformers family, 30x smaller), so values
  are comparable within alignkit, not to the paper's numbers.
NLI diversity (roberta-large-mnli) is left out: no embedded NLI model.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from alignkit.eval.embeddings import embedding_diversity
from alignkit.eval.stats import distinct_n, ead

log = logging.getLogger("alignkit")

DISTINCT_NS = (1, 2, 3, 4)
AVERAGED_NS = (1, 2, 3, 4, 5)


def lexical_diversity(texts: list[str], vocab_size: int = 50257) -> dict[str, float]:
    """distinct-1..4, their Kirk-style mean over n = 1..5, and EAD averaged over n = 1..5."""
    out = {f"distinct_{n}": distinct_n(texts, n) for n in DISTINCT_NS}
    out["distinct_avg"] = float(np.mean([distinct_n(texts, n) for n in AVERAGED_NS]))
    out["ead"] = float(np.mean([ead(texts, n, vocab_size) for n in AVERAGED_NS]))
    return out


def default_embedder() -> Any:
    from alignkit.eval.embeddings import MiniLMEmbedder, minilm_model_dir

    try:
        minilm_model_dir()
    except FileNotFoundError as err:
        log.warning("embedding diversity skipped: %s", err)
        return None
    return MiniLMEmbedder()


def diversity_metrics(
    outputs: list[list[str]],
    *,
    embedder: Any = "minilm",
    vocab_size: int = 50257,
) -> dict[str, dict[str, float | None]]:
    """Per-input and across-input diversity of outputs grouped by prompt.

    `embedder`: "minilm" (the embedded all-MiniLM-L6-v2), None (skip embedding diversity) or
    anything with `encode(texts) -> (N, D)` unit-norm rows. Per-input metrics need >= 2 samples
    per prompt and across-input ones >= 2 prompts; a block that cannot be computed is {}.

    Returns {"per_input": {metric: mean over prompts, metric + "_std": std over prompts},
    "across_input": {metric: value}} with metrics distinct_1..4, distinct_avg, ead, embedding.
    """
    if embedder == "minilm":
        embedder = default_embedder()
    groups = [list(group) for group in outputs if len(group) > 0]
    embeddings = None
    if embedder is not None:
        flat = [text for group in groups for text in group]
        embeddings = embedder.encode(flat) if flat else None

    per_input: dict[str, float | None] = {}
    multi = [i for i, group in enumerate(groups) if len(group) >= 2]
    if multi:
        rows = [lexical_diversity(groups[i], vocab_size) for i in multi]
        if embeddings is not None:
            starts = np.cumsum([0] + [len(g) for g in groups])
            for row, i in zip(rows, multi, strict=True):
                row["embedding"] = embedding_diversity(embeddings[starts[i] : starts[i + 1]])
        for key in rows[0]:
            values = np.array([row[key] for row in rows])
            per_input[key] = float(values.mean())
            per_input[f"{key}_std"] = float(values.std())

    across_input: dict[str, float | None] = {}
    if len(groups) >= 2:
        firsts = [group[0] for group in groups]
        across_input = dict(lexical_diversity(firsts, vocab_size))
        if embeddings is not None:
            starts = np.cumsum([0] + [len(g) for g in groups])[:-1]
            across_input["embedding"] = embedding_diversity(embeddings[starts])
    return {"per_input": per_input, "across_input": across_input}
