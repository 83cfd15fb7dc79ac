"""Denoising chains: sampled with the pipeline's DDIM sampler, or built from given images.

A `Chains` holds B chains of T steps: latents (B, T + 1, C, h, w) from x_T to the last x,
the timestep of each step (T,), the prompt embeddings (B, L, D) and the log-likelihood of each
step under the policy that drew it (B, T; zeros for chains built from images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.diffusion.ddim import ddim_step_logprob, posterior_step
from alignkit.diffusion.noise import BatchPart, standard_normal


@dataclass
class Chains:
    latents: Tensor
    timesteps: Tensor
    embeds: Tensor
    logps: Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]


def encode_prompts(pipeline, prompts: list[str]) -> Tensor:
    """Text-encoder hidden states of `prompts` (B, L, D), tokenised to the tokenizer's max length."""
    tokens = pipeline.tokenizer(prompts, padding="max_length", truncation=True,
                                max_length=pipeline.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return pipeline.text_encoder(tokens.input_ids.to(pipeline.text_encoder.device))[0]


def predict_noise(unet, latents: Tensor, timesteps: Tensor, embeds: Tensor, *,
                  negative_embeds: Tensor | None = None, guidance_scale: float = 1.0) -> Tensor:
    """The UNet's output at `latents` (B, C, h, w), with classifier-free guidance when
    guidance_scale > 1 (`negative_embeds`: the empty prompt's embeddings, (B, L, D))."""
    if guidance_scale <= 1.0 or negative_embeds is None:
        return unet(latents, timesteps, encoder_hidden_states=embeds).sample
    both = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                encoder_hidden_states=torch.cat([negative_embeds, embeds])).sample
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def latent_shape(pipeline, batch: int, resolution: int | None) -> tuple[int, ...]:
    """(B, C, h, w) of the latents for images of `resolution` pixels (default: the UNet's size)."""
    side = resolution // pipeline.vae_scale_factor if resolution else pipeline.unet.config.sample_size
    if isinstance(side, list | tuple):
        side = side[0]
    return (batch, pipeline.unet.config.in_channels, int(side), int(side))


def timesteps_for(pipeline, num_steps: int) -> Tensor:
    pipeline.scheduler.set_timesteps(num_steps)
    return pipeline.scheduler.timesteps.clone()


@torch.no_grad()
def sample_chains(pipeline, unet, embeds: Tensor, *, num_steps: int, eta: float, generator: torch.Generator | BatchPart,
                  initial: Tensor | None = None, resolution: int | None = None,
                  negative_embeds: Tensor | None = None, guidance_scale: float = 1.0) -> Chains:
    """Run the DDIM sampler from noise (`initial`, else drawn from `generator`), recording every
    latent and each step's log-likelihood under `unet`. `generator` may be a `BatchPart`: then
    `embeds` are this rank's rows and every draw is the global batch's (noise.py)."""
    device = embeds.device
    timesteps = timesteps_for(pipeline, num_steps)
    if initial is None:
        initial = standard_normal(latent_shape(pipeline, len(embeds), resolution), generator)
    latents = [initial.to(device) * pipeline.scheduler.init_noise_sigma]
    logps = []
    for t in timesteps:
        batch_t = t.repeat(len(embeds)).to(device)
        noise = predict_noise(unet, latents[-1], batch_t, embeds, negative_embeds=negative_embeds,
                              guidance_scale=guidance_scale)
        following, logp, _ = ddim_step_logprob(pipeline.scheduler, noise, batch_t, latents[-1], eta=eta,
                                               generator=generator)
        latents.append(following)
        logps.append(logp)
    return Chains(torch.stack(latents, dim=1), timesteps, embeds, torch.stack(logps, dim=1))


@torch.no_grad()
def decode_images(pipeline, latents: Tensor) -> list:
    """PIL images of the final latents (B, C, h, w)."""
    vae = pipeline.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return pipeline.image_processor.numpy_to_pil(pixels.permute(0, 2, 3, 1).cpu().numpy())


@torch.no_grad()
def encode_images(pipeline, images: list, resolution: int) -> Tensor:
    """Clean latents x0 (B, C, h, w) of PIL images, resized to `resolution` square: the mean of
    the VAE posterior times its scaling factor."""
    import numpy as np

    arrays = [np.asarray(image.convert("RGB").resize((resolution, resolution)), dtype=np.float32) / 255.0
              for image in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1
    vae = pipeline.vae
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean * vae.config.scaling_factor


@torch.no_grad()
def chains_from_images(pipeline, x0: Tensor, embeds: Tensor, *, num_steps: int, eta: float,
                       generator: torch.Generator | BatchPart, initial: Tensor | None = None) -> Chains:
    """Denoising chains that end at the clean latents `x0`: x_T = sqrt(a_T) x0 + sqrt(1 - a_T) z
    (z = `initial`, else drawn), then each x_{t-1} ~ q_sigma(x_{t-1} | x_t, x0), DDIM's own
    posterior for the same eta (ddim.posterior_step)."""
    timesteps = timesteps_for(pipeline, num_steps)
    alpha_first = pipeline.scheduler.alphas_cumprod[timesteps[0]].to(x0.device, x0.dtype)
    noise = initial if initial is not None else standard_normal(x0.shape, generator)
    latents = [alpha_first.sqrt() * x0 + (1 - alpha_first).sqrt() * noise.to(x0.device, x0.dtype)]
    for t in timesteps:
        batch_t = t.repeat(len(x0)).to(x0.device)
        latents.append(posterior_step(pipeline.scheduler, x0, latents[-1], batch_t, eta=eta, generator=generator))
    logps = torch.zeros(len(x0), len(timesteps), device=x0.device)
    return Chains(torch.stack(latents, dim=1), timesteps, embeds, logps)


def step_logps(pipeline, unet, chains: Chains, step: int, *, eta: float,
               negative_embeds: Tensor | None = None, guidance_scale: float = 1.0) -> Tensor:
    """log pi(x_{t-1} | x_t, c) of step `step` of every chain under `unet` (B,), with gradients."""
    sample = chains.latents[:, step]
    batch_t = chains.timesteps[step].repeat(len(chains)).to(sample.device)
    noise = predict_noise(unet, sample, batch_t, chains.embeds, negative_embeds=negative_embeds,
                          guidance_scale=guidance_scale)
    _, logp, _ = ddim_step_logprob(pipeline.scheduler, noise, batch_t, sample, eta=eta,
                                   prev_sample=chains.latents[:, step + 1])
    return logp
