"""Pure sampling maths: counter-based noise and filtered inverse-CDF draws."""

import pytest
import torch

from alignkit.rollout import SamplingParams
from alignkit.rollout.sampling import counter_uniform, mix32, sample_next_tokens


def _lowbias32_reference(x: int) -> int:
    """Plain-Python lowbias32 with explicit 32-bit wrap-around."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def test_mix32_matches_plain_python():
    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    got = mix32(torch.tensor(values, dtype=torch.long)).tolist()
    assert got == [_lowbias32_reference(v) for v in values]


def test_counter_uniform_of_all_steps_at_once_equals_step_by_step():
    ids = torch.arange(40, dtype=torch.long) * 7 + 3
    table = counter_uniform(11, ids.unsqueeze(-1), torch.arange(9).unsqueeze(0))  # (40, 9)
    assert table.shape == (40, 9)
    for step in range(9):
        assert torch.equal(table[:, step], counter_uniform(11, ids, step))


def test_counter_uniform_is_a_pure_function_of_seed_sample_step():
    ids = torch.arange(1000)
    first = counter_uniform(7, ids, 3)
    assert torch.equal(first, counter_uniform(7, ids, 3))
    # A sample's value does not depend on which other samples are asked for with it.
    assert torch.equal(first[[5, 900]], counter_uniform(7, ids[[5, 900]], 3))
    assert not torch.equal(first, counter_uniform(8, ids, 3))
    assert not torch.equal(first, counter_uniform(7, ids, 4))
    assert first.dtype == torch.float64
    assert 0.0 <= first.min() and first.max() < 1.0


def test_counter_uniform_is_roughly_uniform():
    """Mean 1/2 and variance 1/12 over 200k draws (std errors ~6e-4 and ~2e-4)."""
    draws = counter_uniform(123, torch.arange(200_000), 0)
    assert abs(draws.mean().item() - 0.5) < 4e-3
    assert abs(draws.var().item() - 1 / 12) < 2e-3
    histogram = torch.histc(draws.float(), bins=10, min=0.0, max=1.0) / len(draws)
    torch.testing.assert_close(histogram, torch.full((10,), 0.1), atol=4e-3, rtol=0)


def _empirical(logits: torch.Tensor, sampling: SamplingParams, draws: int = 40_000):
    """Frequencies of each token over `draws` rows that share one logits row."""
    tokens, _ = sample_next_tokens(
        logits.expand(draws, -1), sampling, counter_uniform(0, torch.arange(draws), 0)
    )
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / draws


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_plain_sampling_follows_softmax():
    expected = torch.softmax(LOGITS[0].double() / 0.7, -1)
    got = _empirical(LOGITS, SamplingParams(temperature=0.7))
    torch.testing.assert_close(got, expected, atol=0.01, rtol=0)


def test_top_k_top_p_min_p_follow_the_renormalised_filtered_softmax():
    """softmax(LOGITS) = [.561 .206 .125 .076 .028 .004].
    top_p=0.8: mass before token 2 is .767 < .8 (kept), before token 3 .892 (dropped) -> 3;
    top_k=2 -> 2; min_p=0.2: p >= .2 x .561 = .112 -> 3;
    top_k=4 then top_p=0.7: renormalised [.580 .213 .129 .078], mass before token 2 is .793 -> 2.
    """
    probs = torch.softmax(LOGITS[0].double(), -1)
    for sampling, kept in [
        (SamplingParams(top_p=0.8), 3),
        (SamplingParams(top_k=2), 2),
        (SamplingParams(min_p=0.2), 3),
        (SamplingParams(top_k=4, top_p=0.7), 2),
    ]:
        expected = torch.zeros_like(probs)
        expected[:kept] = probs[:kept] / probs[:kept].sum()
        torch.testing.assert_close(_empirical(LOGITS, sampling), expected, atol=0.01, rtol=0)


def test_logprobs_are_unfiltered_and_temperature_scaled():
    logits = torch.randn(4, 50)
    uniforms = counter_uniform(1, torch.arange(4), 0)
    sampling = SamplingParams(temperature=0.5, top_k=3, top_p=0.9)
    tokens, logprobs = sample_next_tokens(logits, sampling, uniforms)
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == tokens[:, None]).any(-1).all()


@pytest.mark.parametrize("sampling", [SamplingParams(greedy=True), SamplingParams(temperature=0)])
def test_greedy_is_argmax(sampling):
    logits = torch.randn(5, 30)
    tokens, logprobs = sample_next_tokens(logits, sampling, None)
    assert torch.equal(tokens, logits.argmax(-1))
    temperature = sampling.temperature or 1.0
    expected = torch.log_softmax(logits / temperature, -1).amax(-1)
    torch.testing.assert_close(logprobs, expected)


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]])
    tokens, _ = sample_next_tokens(
        logits.expand(5000, -1), SamplingParams(), counter_uniform(3, torch.arange(5000), 0)
    )
    assert set(tokens.tolist()) == {0, 2}


def test_invalid_params_are_refused():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)
