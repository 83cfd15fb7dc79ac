"""`alignkit.lab.eval_metrics`: the named eval.json metrics are exactly the numbers
`evaluate_model` returns, and names parse with their better direction."""

import pytest

from alignkit.lab.eval_metrics import (
    EMBEDDING_METRICS,
    EVAL_METRICS,
    eval_metric_value,
    parse_eval_metric,
)
from alignkit.lab.generation_eval import evaluate_model
from alignkit.models import load_model
from alignkit.rewards import load_reward
from alignkit.testing import build_tiny_model

NOT_METRICS = {"n", "prompts", "samples_per_prompt"}  # counts of the evaluation, not of the model
NOT_THE_MODELS = ("settings", "reference_metrics", "win_rate_details", "samples", "completions")


def numeric_leaves(tree, prefix=""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from numeric_leaves(value, name + "/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield name


def test_the_table_names_every_number_evaluate_model_returns(tmp_path):
    """Tiny policy and reference, 2 prompts x 2 samples, lexical diversity (no embedder): every
    numeric leaf but the counts and the reference's own numbers is in EVAL_METRICS, and every
    name of the table but the embedding ones is there and reads back as a float."""
    policy, tokenizer = load_model(str(build_tiny_model(tmp_path / "p", seed=0)), device="cpu")
    reference, _ = load_model(str(build_tiny_model(tmp_path / "r", seed=1)), device="cpu")
    result = evaluate_model(policy, tokenizer, ["Hello there", "The movie"], reward=load_reward("length:4"),
                            reference=reference, samples=2, max_new_tokens=4, embedder=None)
    found = {name for name in numeric_leaves({k: v for k, v in result.items() if k not in NOT_THE_MODELS})}
    assert found - NOT_METRICS == set(EVAL_METRICS) - set(EMBEDDING_METRICS)
    for name in found - NOT_METRICS:
        assert isinstance(eval_metric_value(result, name), float)
    with pytest.raises(ValueError, match="embedded MiniLM"):
        eval_metric_value(result, "diversity/per_input/embedding")


def test_names_parse_with_their_direction():
    assert parse_eval_metric("gold_reward") == ("gold_reward", "max")
    assert parse_eval_metric("kl") == ("kl", "min")
    assert parse_eval_metric("kl:max") == ("kl", "max")  # said explicitly, it wins
    assert parse_eval_metric("diversity/across_input/ead") == ("diversity/across_input/ead", "max")
    with pytest.raises(ValueError, match="no better direction"):
        parse_eval_metric("gold_reward_std")
    with pytest.raises(ValueError, match="unknown eval metric 'kl:up'"):
        parse_eval_metric("kl:up")
