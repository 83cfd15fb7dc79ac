"""One training round of d3po or prdp: the pairs of chains it learns from, and their loss.

A round gathers B pairs of denoising chains (a, b) for B prompts:

- d3po from image pairs: a = chain ending at image_chosen, b = at image_rejected, built with
  DDIM's posterior from a shared x_T (`chains_from_images`);
- d3po with --reward: two chains sampled by the current UNet from a shared x_T (as D3PO's
  scripts/rm/train_d3po.py does); the higher reward is preferred, a tie teaches nothing
  (weight 0: OUR DEVIATION, the official `compare` sends ties to the second sample);
- prdp: two chains sampled independently per prompt, each scored by the reward.

`pair_losses` then computes, step by step with gradients, the per-(pair, step) loss of the
round's chains under the UNet (alignkit.objectives.diffusion) and backpropagates it, so only
one denoising step's activations live at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit.diffusion.noise import BatchPart, standard_normal
from alignkit.diffusion.rewards import score_images
from alignkit.diffusion.sampling import (
    Chains,
    chains_from_images,
    decode_images,
    encode_images,
    encode_prompts,
    latent_shape,
    sample_chains,
    step_logps,
)
from alignkit.objectives.diffusion import DIFFUSION, clipped_log_ratio


@dataclass
class RoundPairs:
    """B pairs of chains; `weights` (B,) is 1 for a pair that teaches, 0 for a tie."""

    first: Chains
    second: Chains
    weights: Tensor
    rewards_first: Tensor | None = None
    rewards_second: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SamplerSettings:
    num_steps: int
    eta: float
    guidance_scale: float
    resolution: int | None

    def negative(self, pipeline, embeds: Tensor) -> Tensor | None:
        """The empty prompt's embeddings for classifier-free guidance (None without guidance)."""
        if self.guidance_scale <= 1.0:
            return None
        return encode_prompts(pipeline, [""]).expand(len(embeds), -1, -1)


def image_pair_round(pipeline, pairs, indices: list[int], settings: SamplerSettings,
                     generator: torch.Generator | BatchPart, latent_cache: dict[int, tuple[Tensor, Tensor]]
                     ) -> RoundPairs:
    """Chains ending at the chosen and rejected images of rows `indices` (shared x_T per pair);
    with a `BatchPart`, `indices` are this rank's rows and the noise is the global batch's."""
    resolution = settings.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    for i in indices:
        if i not in latent_cache:
            chosen, rejected = pairs.images(i)
            latent_cache[i] = tuple(encode_images(pipeline, [chosen, rejected], resolution))
    x0_chosen = torch.stack([latent_cache[i][0] for i in indices])
    x0_rejected = torch.stack([latent_cache[i][1] for i in indices])
    embeds = encode_prompts(pipeline, [pairs.prompts[i] for i in indices])
    initial = standard_normal(x0_chosen.shape, generator)
    first = chains_from_images(pipeline, x0_chosen, embeds, num_steps=settings.num_steps, eta=settings.eta,
                               generator=generator, initial=initial)
    second = chains_from_images(pipeline, x0_rejected, embeds, num_steps=settings.num_steps, eta=settings.eta,
                                generator=generator, initial=initial)
    return RoundPairs(first, second, torch.ones(len(indices)))


def sampled_round(pipeline, unet, prompts: list[str], columns: dict[str, list], reward, reward_name: str,
                  settings: SamplerSettings, generator: torch.Generator | BatchPart, *, shared_noise: bool
                  ) -> RoundPairs:
    """Two chains per prompt sampled by `unet` and scored by `reward`; with `shared_noise` both
    start from one x_T (d3po), else from independent ones (prdp). With a `BatchPart`, `prompts`
    are this rank's rows: the reward scores this rank's images, and the metrics (reward mean and
    std, ties) are over the global batch's scores, gathered from every rank."""
    embeds = encode_prompts(pipeline, prompts)
    negative = settings.negative(pipeline, embeds)
    shape = latent_shape(pipeline, len(prompts), settings.resolution)
    start_a = standard_normal(shape, generator)
    start_b = start_a if shared_noise else standard_normal(shape, generator)
    options = dict(num_steps=settings.num_steps, eta=settings.eta, generator=generator,
                   negative_embeds=negative, guidance_scale=settings.guidance_scale)
    first = sample_chains(pipeline, unet, embeds, initial=start_a, **options)
    second = sample_chains(pipeline, unet, embeds, initial=start_b, **options)
    images = decode_images(pipeline, torch.cat([first.latents[:, -1], second.latents[:, -1]]))
    doubled = {name: values + values for name, values in columns.items()}
    scores = torch.tensor(score_images(reward, prompts + prompts, images, doubled, reward_name))
    rewards_a, rewards_b = scores[: len(prompts)], scores[len(prompts):]
    everyone = torch.cat([global_rows(rewards_a, generator), global_rows(rewards_b, generator)])
    metrics = {"reward/mean": float(everyone.mean()), "reward/std": float(everyone.std(unbiased=False))}
    if shared_noise:  # d3po: the preferred chain goes first
        swap = rewards_b > rewards_a
        first, second = swap_chains(first, second, swap)
        rewards_a, rewards_b = torch.where(swap, rewards_b, rewards_a), torch.where(swap, rewards_a, rewards_b)
        weights = (rewards_a != rewards_b).float()
        metrics["ties"] = float(1 - global_rows(weights, generator).mean())
    else:
        weights = torch.ones(len(prompts))
    return RoundPairs(first, second, weights, rewards_a, rewards_b, metrics)


def global_rows(values: Tensor, generator: torch.Generator | BatchPart) -> Tensor:
    """The global batch's (B,) values from this rank's rows (a generator: they are all of them)."""
    return generator.gather(values) if isinstance(generator, BatchPart) else values


def swap_chains(first: Chains, second: Chains, swap: Tensor) -> tuple[Chains, Chains]:
    """Exchange pairs where `swap` (B,) is True, so `first` holds the preferred chain."""

    def pick(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        where = swap.reshape((-1,) + (1,) * (a.ndim - 1)).to(a.device)
        return torch.where(where, b, a), torch.where(where, a, b)

    latents_a, latents_b = pick(first.latents, second.latents)
    logps_a, logps_b = pick(first.logps, second.logps)
    return (Chains(latents_a, first.timesteps, first.embeds, logps_a),
            Chains(latents_b, second.timesteps, second.embeds, logps_b))


def stacked(first: Chains, second: Chains) -> Chains:
    """Both halves of the pairs as one batch of 2B chains (one UNet call per step)."""
    return Chains(torch.cat([first.latents, second.latents]), first.timesteps,
                  torch.cat([first.embeds, second.embeds]), torch.cat([first.logps, second.logps]))


def pair_losses(pipeline, unet, round_pairs: RoundPairs, algorithm: str, hparams: dict, settings: SamplerSettings,
                reference=None, *, teaching: float | None = None, global_pairs: int | None = None
                ) -> dict[str, float]:
    """Backpropagate the round's loss, mean over teaching pairs and steps; return its metrics.

    d3po's base log-probs come from `reference` (a context manager factory giving the frozen
    UNet: LoRA disabled, or a frozen copy), prdp's from the chains' own sampling log-probs.

    Every metric is a sum over the round's pairs divided by a count of the whole batch:
    `teaching` (pairs of weight 1, ties weigh 0; default: this round's, at least 1) for the loss
    and the reward margins and accuracies, `global_pairs` (default: this round's) for the clip
    ratio and log-probs. Under torchrun the caller passes the global counts, so a rank's loss
    and metrics are its share of the global ones: summed over ranks they are one process's
    (and so are the gradients)."""
    both = stacked(round_pairs.first, round_pairs.second)
    negative = settings.negative(pipeline, both.embeds)
    size = len(round_pairs.first)
    weights = round_pairs.weights.to(both.latents.device)
    teaching = max(float(weights.sum()) if teaching is None else float(teaching), 1.0)
    global_pairs = size if global_pairs is None else int(global_pairs)
    steps = both.logps.shape[1]
    loss_fn = DIFFUSION[algorithm]
    totals: dict[str, float] = {"loss": 0.0, "clip_ratio": 0.0}
    extra: dict[str, float] = {}
    for step in range(steps):
        logps = step_logps(pipeline, unet, both, step, eta=settings.eta, negative_embeds=negative,
                           guidance_scale=settings.guidance_scale)
        if algorithm == "d3po":
            with torch.no_grad(), reference() as frozen:
                base = step_logps(pipeline, frozen, both, step, eta=settings.eta, negative_embeds=negative,
                                  guidance_scale=settings.guidance_scale)
            losses = loss_fn(logps[:size], base[:size], logps[size:], base[size:],
                             beta=hparams["beta"], eps=hparams["eps"])
            eps = hparams["eps"]
            margin = hparams["beta"] * (clipped_log_ratio(logps[:size], base[:size], eps)
                                        - clipped_log_ratio(logps[size:], base[size:], eps)).detach()
            add(extra, "rewards/margins", float((margin * weights).sum() / teaching) / steps)
            add(extra, "rewards/accuracies", float(((margin > 0).float() * weights).sum() / teaching) / steps)
            add(extra, "logps/chosen", float(logps[:size].detach().sum()) / global_pairs / steps)
            add(extra, "logps/rejected", float(logps[size:].detach().sum()) / global_pairs / steps)
        else:
            base = both.logps[:, step].to(logps.device)
            losses = loss_fn(logps[:size], base[:size], logps[size:], base[size:],
                             round_pairs.rewards_first.to(logps.device), round_pairs.rewards_second.to(logps.device),
                             num_steps=steps, beta=hparams["beta"], clip_eps=hparams["clip_eps"])
            eps = hparams["clip_eps"]
        ratio = (logps - base).detach()
        outside = ((ratio < torch.log1p(torch.tensor(-eps))) | (ratio > torch.log1p(torch.tensor(eps)))).float()
        totals["clip_ratio"] += float(outside.sum()) / (2 * global_pairs) / steps
        loss = (losses * weights).sum() / teaching / steps
        loss.backward()
        totals["loss"] += float(loss.detach())
    return {**totals, **extra}


def add(metrics: dict[str, float], key: str, value: float) -> None:
    metrics[key] = metrics.get(key, 0.0) + value
