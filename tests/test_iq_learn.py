"""`iq_learn` (IQ-Learn as TD-regularised MLE): the per-token loss on a 3-token vocabulary by
hand, masked positions ignored, the value of the next state carries gradient, lambda = 0 is the
SFT loss on the tiny model to 1e-6, training lowers held-out NLL, bad settings fail in one line."""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import read_metrics
from torch.testing import assert_close

import alignkit
from alignkit.data import RowTable, collate_sequences, tokenize_sft
from alignkit.models import load_model
from alignkit.objectives.iq_learn import iq_learn_token_losses, next_state_values
from alignkit.testing import synthetic_sft
from alignkit.training.offline.tasks import make_task
from alignkit.training.run.config import TrainConfig

LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)


def worked_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row, a prompt token then two response tokens, vocabulary {0, 1, 2}:
    logits of s_1 = [0, ln 2, 0] (V = ln 4), target 1;  logits of s_2 = [ln 3, 0, 0] (V = ln 5),
    target 0. Aligned to tokens: taken_q = [0, ln 2, ln 3], V = [0, ln 4, ln 5]."""
    logits = torch.tensor([[[0.0, LN2, 0.0], [LN3, 0.0, 0.0]]], dtype=torch.float64)
    values = logits.logsumexp(-1)  # (1, 2): ln 4, ln 5
    taken = logits.gather(-1, torch.tensor([[[1], [0]]])).squeeze(-1)  # ln 2, ln 3
    pad = torch.zeros((1, 1), dtype=torch.float64)
    mask = torch.tensor([[False, True, True]])
    return torch.cat([pad, taken], 1), torch.cat([pad, values], 1), mask


def test_iq_learn_worked_example_on_a_three_token_vocabulary():
    """lambda = 0.5, gamma = 1:
    token 1: -log pi = ln 4 - ln 2 = ln 2;  r = ln 2 - V(s_2) = ln 2 - ln 5 = -0.916291
             l = 0.693147 + 0.5 * 0.839589 = 1.112942
    token 2 (last, terminal): -log pi = ln 5 - ln 3 = 0.510826;  r = ln 3 - 0 = 1.098612
             l = 0.510826 + 0.5 * 1.206949 = 1.114300
    gamma = 0.5 changes token 1 only: r = ln 2 - 0.5 ln 5 = -0.111496, l = 0.693147 + 0.5 * 0.012431 = 0.699371."""
    taken, values, mask = worked_example()
    losses, rewards = iq_learn_token_losses(taken, values, mask, lambda_=0.5, gamma=1.0)
    expected = torch.tensor([[0.0, 1.1129415332, 1.1143001042]], dtype=torch.float64)
    assert_close(losses, expected)
    assert_close(rewards, torch.tensor([[0.0, LN2 - LN5, LN3]], dtype=torch.float64))
    half, _ = iq_learn_token_losses(taken, values, mask, lambda_=0.5, gamma=0.5)
    assert_close(half[0, 1], torch.tensor(0.6993713111, dtype=torch.float64))
    assert_close(half[0, 2], expected[0, 2])


def test_lambda_zero_is_the_token_nll_and_temperature_scales_log_pi():
    """-log pi = (V - Q) / tau: at tau = 2 with Q and V given, the MLE term halves."""
    taken, values, mask = worked_example()
    losses, _ = iq_learn_token_losses(taken, values, mask, lambda_=0.0)
    assert_close(losses, torch.tensor([[0.0, LN2, LN5 - LN3]], dtype=torch.float64))
    halved, _ = iq_learn_token_losses(taken, values, mask, lambda_=0.0, temperature=2.0)
    assert_close(halved, losses / 2)


def test_masked_positions_are_ignored_and_the_episode_ends_at_the_last_scored_token():
    """Garbage on unscored positions (prompt, padding) changes neither loss nor rewards, and
    the last scored token's next value is 0 even when a padding value follows it."""
    taken, values, mask = worked_example()
    padded_taken = torch.cat([taken, torch.tensor([[7.0]], dtype=torch.float64)], 1)
    padded_values = torch.cat([values, torch.tensor([[9.0]], dtype=torch.float64)], 1)
    padded_mask = torch.cat([mask, torch.tensor([[False]])], 1)
    padded_taken[0, 0], padded_values[0, 0] = 5.0, -3.0
    losses, rewards = iq_learn_token_losses(padded_taken, padded_values, padded_mask, lambda_=0.5)
    reference, reference_rewards = iq_learn_token_losses(taken, values, mask, lambda_=0.5)
    assert_close(losses[:, :3], reference)
    assert_close(rewards[:, :3], reference_rewards)
    assert losses[0, 3] == 0 and rewards[0, 3] == 0
    assert_close(next_state_values(padded_values, padded_mask)[0], torch.tensor([0.0, LN5, 0.0, 0.0],
                                                                               dtype=torch.float64))


def test_the_regulariser_sends_gradient_into_the_next_state_value():
    """With lambda > 0 and gamma > 0, d loss / d V(s_2) gets the TD term -2 lambda gamma r_1
    on top of the MLE term of token 2 (+1): at lambda = 0.5, gamma = 1: 1 - (ln 2 - ln 5) = 1.916291."""
    taken, values, mask = worked_example()
    values = values.clone().requires_grad_(True)
    losses, _ = iq_learn_token_losses(taken, values, mask, lambda_=0.5, gamma=1.0)
    losses.sum().backward()
    assert_close(values.grad[0, 2], torch.tensor(1.0 - (LN2 - LN5), dtype=torch.float64))


def test_mismatched_shapes_fail_in_one_line():
    taken, values, mask = worked_example()
    with pytest.raises(ValueError, match=r"iq_learn: taken_q \(1, 3\), state_values \(1, 2\)"):
        iq_learn_token_losses(taken, values[:, :2], mask)


def sft_batch(model_dir, rows):
    model, tokenizer = load_model(str(model_dir), kind="causal_lm")
    examples, _ = tokenize_sft(RowTable(rows), tokenizer, max_length=64)
    return model, collate_sequences(examples, tokenizer.pad_token_id)


def test_iq_learn_with_lambda_zero_is_sft_on_the_tiny_model(tiny_model_dir):
    """The documented MLE limit: lambda_ = 0 gives SFT's loss (token-mean NLL) to 1e-6, and its
    gradient, on a ragged batch (padding) of the tiny model."""
    model, batch = sft_batch(tiny_model_dir, synthetic_sft(6, seed=3))
    losses, grads = [], []
    for algorithm, hparams in (("sft", {}), ("iq_learn", {"lambda_": 0.0, "gamma": 0.7})):
        task = make_task(TrainConfig(algorithm=algorithm, model=str(tiny_model_dir), hparams=hparams,
                                     logp_chunk_size=5))
        model.zero_grad()
        loss, metrics = task.loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.lm_head.weight.grad.clone())
    assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_iq_learn_lowers_held_out_nll_and_logs_the_td_terms(tiny_model_dir, tmp_path):
    rows = synthetic_sft(80, seed=0)
    alignkit.train(
        "iq_learn", model=str(tiny_model_dir), data=rows[:64], eval_data=rows[64:], output_dir=tmp_path / "iq",
        batch_size=8, max_steps=30, lr=5e-3, eval_steps=10, progress=False, lambda_=0.1,
    )
    metrics = read_metrics(tmp_path / "iq")
    evals = [r["eval/nll"] for r in metrics if "eval/nll" in r]
    assert evals[-1] < 0.7 * evals[0]
    assert {"loss", "nll", "td/reward_mean", "td/reward_sq"} <= set(metrics[0])
    trained = [r for r in metrics if "td/reward_sq" in r]
    assert trained[-1]["loss"] < trained[0]["loss"]


@pytest.mark.parametrize(("hparams", "message"), [
    ({"lambda_": -1.0}, r"lambda_"),
    ({"gamma": 1.5}, r"gamma"),
    ({"temperature": 0.0}, r"temperature"),
    ({"beta": 0.1}, r"iq_learn: unknown hyper-parameter\(s\) \['beta'\]"),
])
def test_bad_settings_fail_in_one_line(hparams, message, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=message) as caught:
        alignkit.train("iq_learn", model=str(tiny_model_dir), data=synthetic_sft(4), output_dir=tmp_path / "x",
                       progress=False, max_steps=1, **hparams)
    assert "\n" not in str(caught.value)
