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


# The files whose module fixtures launch torchrun ranks, Ray clusters or long learning runs
# (minutes each on 2 cores), longest first. `make test` runs the suite on one pytest-xdist
# worker per core with whole files per worker (--dist loadfile), and a file starts in
# collection order: starting these first keeps one of them from being the last minutes.
LONG_FILES = (
    "test_ray_placement.py", "test_distributed_online.py", "test_distributed_family.py",
    "test_distributed_offline.py", "test_distributed_vlm.py", "test_online_filtered.py",
    "test_diffusion_distributed.py", "test_online.py", "test_online_dense.py", "test_vlm_offline.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Long files first (in LONG_FILES' order), every other test in its collected order."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
