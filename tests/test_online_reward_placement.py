"""A reward model named by a spec (`--reward rm:DIR`, `judge:MODEL`) loads on the run's device
and dtype, as `--reward-model DIR` does: before, `rm:DIR` ignored --device/--dtype (under
torchrun on GPUs every rank would have loaded it on cuda:0, in float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.training.online.build import load_reward_role
from alignkit.training.online.presets import resolve_settings
from alignkit.training.online.reward_specs import model_placement
from alignkit.training.run.config import TrainConfig


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm")
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_placement_of_each_spec_kind(rm_dir):
    config = TrainConfig(algorithm="grpo", device="cpu", dtype="bfloat16")
    assert model_placement(f"rm:{rm_dir}", config) == {"device": "cpu", "dtype": "bfloat16"}
    assert model_placement(str(rm_dir), config) == {"device": "cpu", "dtype": "bfloat16"}
    assert model_placement("judge:some/model,threshold=0.5", config) == {"device": "cpu"}
    assert model_placement("http://127.0.0.1:8000/score", config) == {}
    assert model_placement("vader", config) == {}
    assert model_placement(f"rm:{rm_dir}", None) == {}
    assert model_placement(f"rm:{rm_dir}", TrainConfig(algorithm="grpo")) == {"device": None}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_rm_spec_loads_in_the_runs_dtype(rm_dir, tiny_model_dir, dtype):
    config = TrainConfig(algorithm="grpo", model=str(tiny_model_dir), reward=f"rm:{rm_dir}", device="cpu",
                         dtype=dtype)
    config.hparams = {}
    role = load_reward_role(config, None, AutoTokenizer.from_pretrained(tiny_model_dir),
                            resolve_settings(config, "grpo"))
    weights = {p.dtype for p in role.fn.model.parameters()}
    assert weights == {getattr(torch, dtype)}
    scores = role.fn(["Tell me"], [" a story"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()
