"""Our DDIM step (alignkit.diffusion.ddim) against diffusers' own `DDIMScheduler.step`."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from alignkit.diffusion.ddim import ddim_step_logprob, posterior_step, step_coefficients  # noqa: E402


def scheduler(prediction_type: str = "epsilon", steps: int = 5, **options) -> DDIMScheduler:
    settings = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    made = DDIMScheduler(**{**settings, **options})
    made.set_timesteps(steps)
    return made


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_mean_equals_the_scheduler_step_without_noise(prediction_type, eta):
    """With variance_noise = 0 diffusers' step returns the mean of the step's Gaussian: ours,
    at every timestep of the schedule (the last one lands on final_alpha_cumprod)."""
    sched = scheduler(prediction_type)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 3, 3, generator=generator)
    output = torch.randn(2, 4, 3, 3, generator=generator)
    for t in sched.timesteps:
        expected = sched.step(output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
        _, _, mean = ddim_step_logprob(sched, output, t.repeat(2), sample, eta=eta)
        assert_close(mean, expected, rtol=1e-4, atol=5e-5)  # float32 rounding of the coefficients


def test_sampled_step_matches_the_scheduler_with_the_same_noise_and_its_logprob_is_gaussian():
    sched = scheduler()
    sample, output = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = sched.timesteps[1]
    prev, logp, mean = ddim_step_logprob(sched, output, t.repeat(3), sample, eta=1.0,
                                         generator=torch.Generator().manual_seed(7))
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(7))
    expected = sched.step(output, t, sample, eta=1.0, variance_noise=noise).prev_sample
    assert_close(prev, expected, rtol=1e-5, atol=1e-6)
    std = step_coefficients(sched, t.repeat(3), 1.0, sample).std
    reference = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(prev).mean(dim=(1, 2, 3))
    assert_close(logp, reference)


def test_logprob_of_a_given_step_has_gradients_through_the_mean_only():
    sched = scheduler()
    sample = torch.randn(2, 4, 2, 2)
    output = torch.randn(2, 4, 2, 2, requires_grad=True)
    target = torch.randn(2, 4, 2, 2, requires_grad=True)
    _, logp, _ = ddim_step_logprob(sched, output, sched.timesteps[0].repeat(2), sample, eta=1.0, prev_sample=target)
    logp.sum().backward()
    assert output.grad.abs().sum() > 0 and target.grad is None


def test_a_deterministic_step_is_refused():
    sched = scheduler()
    sample = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="sigma = 0"):
        ddim_step_logprob(sched, sample, sched.timesteps[0].repeat(1), sample, eta=0.0)
    last_step_to_one = scheduler(set_alpha_to_one=True)
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddim_step_logprob(last_step_to_one, sample, last_step_to_one.timesteps[-1].repeat(1), sample, eta=1.0)


def test_posterior_chain_from_a_clean_latent_ends_near_it():
    """x_T = sqrt(a_T) x0 + sqrt(1 - a_T) z, then x_{t-1} ~ q_sigma(x_{t-1} | x_t, x0): the chain
    ends at sqrt(a_final) x0 plus noise of std sigma_last (about 0.03 here)."""
    sched = scheduler(steps=5)
    x0 = torch.randn(2, 4, 4, 4)
    generator = torch.Generator().manual_seed(3)
    alpha = sched.alphas_cumprod[sched.timesteps[0]]
    latent = alpha.sqrt() * x0 + (1 - alpha).sqrt() * torch.randn(x0.shape, generator=generator)
    for t in sched.timesteps:
        latent = posterior_step(sched, x0, latent, t.repeat(2), eta=1.0, generator=generator)
    assert (latent - x0).abs().mean() < 0.1
    assert (latent - x0).abs().mean() > 0  # sampled, not copied
