"""Sentence embeddings for embedding-based rewards; the encoder itself lives in `alignkit.eval`.

`MiniLMEmbedder` is defined in `alignkit.eval.embeddings` because `eval/` sits below
`rewards/` in the layer order and its diversity metrics need the same encoder.
"""

from alignkit.eval.embeddings import MiniLMEmbedder, embedding_diversity, minilm_model_dir

__all__ = ["MiniLMEmbedder", "embedding_diversity", "minilm_model_dir"]
