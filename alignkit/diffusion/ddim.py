"""One DDIM step as a Gaussian policy, and the log-likelihood of a taken step.

DDIM (Song et al. 2021, eqs. 12 and 16) with eta > 0 samples the previous latent as

    x_{t-1} ~ N(mu, sigma_t^2 I),
    mu      = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat,
    sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev),

where a_t is the scheduler's cumulative alpha at timestep t, a_prev the one at
t - num_train_timesteps / num_inference_steps (the scheduler's `final_alpha_cumprod` past the
start), and (x0_hat, eps_hat) come from the UNet's output by the scheduler's prediction type.
Treating each step as one action of an MDP (DDPO, Black et al. 2023; D3PO, Yang et al. 2024)
needs log N(x_{t-1}; mu, sigma_t^2 I). As in DDPO's and D3PO's code (`ddim_step_with_logprob`)
the per-element log-density is averaged over the latent's elements (not summed), which keeps
the numbers of a 4x64x64 latent in a range where ratio clipping at 1 +- eps means something.

Checked against diffusers' `DDIMScheduler.step` (its mean equals ours when the noise is zero:
tests/test_diffusion_ddim.py) and against D3PO's `d3po_pytorch/diffusers_patch/
ddim_with_logprob.py`. One deliberate difference: D3PO clamps the previous timestep at 0 before
choosing between alphas_cumprod and final_alpha_cumprod, so its last step never uses
final_alpha_cumprod; we use it as the scheduler's own `step` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.diffusion.noise import BatchPart, standard_normal


@dataclass(frozen=True)
class StepCoefficients:
    """Per-sample scalars of one DDIM step, each (B, 1, 1, 1) so they broadcast over latents."""

    alpha_prod: Tensor
    alpha_prod_prev: Tensor
    std: Tensor


def previous_timesteps(scheduler, timesteps: Tensor) -> Tensor:
    """The timestep each DDIM step lands on (negative past the start), as `DDIMScheduler.step`."""
    return timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def step_coefficients(scheduler, timesteps: Tensor, eta: float, like: Tensor) -> StepCoefficients:
    """a_t, a_prev and sigma_t of the steps from `timesteps` (B,), shaped to broadcast over `like`."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(n) before taking DDIM steps")
    cumprod = scheduler.alphas_cumprod.to(torch.float64)
    timesteps = timesteps.to("cpu", torch.long)
    previous = previous_timesteps(scheduler, timesteps)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    alpha_prod = cumprod[timesteps]
    alpha_prod_prev = torch.where(previous >= 0, cumprod[previous.clamp(min=0)], final)
    variance = (1 - alpha_prod_prev) / (1 - alpha_prod) * (1 - alpha_prod / alpha_prod_prev)
    std = eta * variance.clamp(min=0).sqrt()
    shape = (-1,) + (1,) * (like.ndim - 1)

    def place(value: Tensor) -> Tensor:
        return value.to(like.device, like.dtype).reshape(shape)

    return StepCoefficients(place(alpha_prod), place(alpha_prod_prev), place(std))


def predicted_x0_and_noise(scheduler, model_output: Tensor, sample: Tensor, alpha_prod: Tensor) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from the UNet output, by `scheduler.config.prediction_type` (DDIM eq. 12),
    with x0_hat clipped when the scheduler clips samples."""
    kind = scheduler.config.prediction_type
    beta_prod = 1 - alpha_prod
    if kind == "epsilon":
        x0 = (sample - beta_prod.sqrt() * model_output) / alpha_prod.sqrt()
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (sample - alpha_prod.sqrt() * x0) / beta_prod.sqrt()
    elif kind == "v_prediction":
        x0 = alpha_prod.sqrt() * sample - beta_prod.sqrt() * model_output
        eps = alpha_prod.sqrt() * model_output + beta_prod.sqrt() * sample
    else:
        raise ValueError(f"scheduler prediction_type {kind!r}: expected epsilon, sample or v_prediction")
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("DDIMScheduler thresholding=True is not supported for log-likelihoods; set it to False")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    return x0, eps


def ddim_mean(x0: Tensor, eps: Tensor, coefficients: StepCoefficients) -> Tensor:
    """mu = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps (DDIM eq. 12)."""
    direction = (1 - coefficients.alpha_prod_prev - coefficients.std**2).clamp(min=0).sqrt()
    return coefficients.alpha_prod_prev.sqrt() * x0 + direction * eps


def gaussian_logprob(value: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean over all but the first dimension of log N(value; mean, std^2), (B,)."""
    elementwise = -((value - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return elementwise.mean(dim=tuple(range(1, elementwise.ndim)))


def ddim_step_logprob(
    scheduler,
    model_output: Tensor,
    timesteps: Tensor,
    sample: Tensor,
    *,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | BatchPart | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DDIM step from `sample` (B, C, H, W) at `timesteps` (B,): (prev_sample, log_prob (B,),
    mean). Without `prev_sample` one is drawn (noise from `generator`, or this rank's rows of
    the global batch's draw when it is a `BatchPart`); with it, its
    log-likelihood under the step is returned (gradients flow through the mean, not the value).
    A step with sigma = 0 (eta = 0, or set_alpha_to_one at the last step) has no density: an error."""
    coefficients = step_coefficients(scheduler, timesteps, eta, sample)
    if bool((coefficients.std <= 0).any()):
        raise ValueError("a DDIM step with sigma = 0 has no log-likelihood: use eta > 0 and a scheduler "
                         "with set_alpha_to_one=False (its last step is otherwise deterministic)")
    x0, eps = predicted_x0_and_noise(scheduler, model_output, sample, coefficients.alpha_prod)
    mean = ddim_mean(x0, eps, coefficients)
    if prev_sample is None:
        noise = standard_normal(sample.shape, generator)
        prev_sample = mean.detach() + coefficients.std * noise.to(sample.device, sample.dtype)
    return prev_sample, gaussian_logprob(prev_sample.detach(), mean, coefficients.std), mean


def posterior_step(scheduler, x0: Tensor, sample: Tensor, timesteps: Tensor, *, eta: float,
                   generator: torch.Generator | BatchPart | None = None) -> Tensor:
    """Draw x_{t-1} ~ q_sigma(x_{t-1} | x_t, x0) (DDIM eq. 7): the DDIM step whose noise estimate is
    the one `sample` actually holds given the clean latent `x0`. Chained from a noised x_T, it
    builds a denoising trajectory that ends at `x0` (how D3PO's trainer reads image pairs)."""
    coefficients = step_coefficients(scheduler, timesteps, eta, sample)
    eps = (sample - coefficients.alpha_prod.sqrt() * x0) / (1 - coefficients.alpha_prod).sqrt()
    mean = ddim_mean(x0, eps, coefficients)
    noise = standard_normal(sample.shape, generator)
    return mean + coefficients.std * noise.to(sample.device, sample.dtype)
