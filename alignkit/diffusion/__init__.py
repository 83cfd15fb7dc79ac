"""Preference and reward fine-tuning of text-to-image diffusion models (diffusers): d3po, prdp.

- `tasks.py`     the registered algorithms and their hyper-parameters (no diffusers import)
- `trainer.py`   the loop: rounds, per-step losses, checkpoints, resume, final/ pipeline
- `rounds.py`    one round's pairs of denoising chains (from image pairs or sampled) and loss
- `sampling.py`  DDIM chains with per-step log-likelihoods; chains built from images
- `ddim.py`      one DDIM step as a Gaussian policy (its mean, sigma and log-likelihood)
- `noise.py`     a round's noise drawn for the global batch, each torchrun rank keeping its rows
- `pipeline.py`  loading (`alignkit[diffusion]`), LoRA on the UNet, writing final/
- `data.py`      image-pair and prompt data, validated with file/row errors
- `rewards.py`   image rewards: redness, brightness, a stand-in aesthetic probe, Python specs

Layer: part of training/ (it imports models/, data/, rewards/, objectives/ and training/run/).
"""
