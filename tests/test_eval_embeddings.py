"""all-MiniLM-L6-v2 from the embedded package: loading, pooling, paraphrase similarity."""

from __future__ import annotations

import pytest
import torch

from alignkit.eval.embeddings import mean_pool, minilm_model_dir


def test_mean_pool_ignores_padding():
    """row 0 mask [1, 1, 0]: mean of (1, 3) = 2 ; row 1 mask [1, 0, 0]: 5."""
    hidden = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [100.0], [100.0]]])  # (2, 3, 1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0], [5.0]]))


@pytest.fixture(scope="module")
def embedder():
    try:
        minilm_model_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from alignkit.rewards.embeddings import MiniLMEmbedder

    return MiniLMEmbedder(device="cpu")


def test_minilm_paraphrases_are_closer_than_unrelated(embedder):
    texts = [
        "The cat is sitting on the mat.",
        "A cat sits on a rug.",
        "Stock markets fell sharply on Monday.",
        "The movie was wonderful and I loved it.",
        "I really enjoyed this film, it was great.",
    ]
    emb = embedder.encode(texts, batch_size=2)  # several batches, sorted by length inside
    assert emb.shape == (5, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] + 0.3
    assert cos[3, 4] > cos[3, 2] + 0.3
    assert cos[3, 4] > 0.6


def test_minilm_order_and_batching_do_not_change_embeddings(embedder):
    texts = ["short", "a somewhat longer sentence about cats", "mid length text"]
    together = embedder.encode(texts, batch_size=64)
    one_by_one = torch.cat([embedder.encode([t]) for t in texts])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-4)
    assert embedder.encode([]).shape == (0, 384)


def test_embedding_diversity(embedder):
    from alignkit.eval import embedding_diversity

    same = embedder.encode(["I loved this film."] * 4)
    varied = embedder.encode(
        ["I loved this film.", "Taxes are due in April.", "The cat sleeps.", "Rain tomorrow."]
    )
    assert embedding_diversity(same) == pytest.approx(0.0, abs=1e-5)
    assert embedding_diversity(varied) > 0.6
    # agrees with the explicit mean over unordered pairs
    cos = varied @ varied.T
    pairs = [cos[i, j] for i in range(4) for j in range(i + 1, 4)]
    assert embedding_diversity(varied) == pytest.approx(1 - float(sum(pairs) / 6), abs=1e-5)
