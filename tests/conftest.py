import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and a busy machine makes OpenMP's spinning
# threads pay heavily: one thread keeps test times stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama-style model + BPE tokenizer saved with save_pretrained."""
    from alignkit.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
