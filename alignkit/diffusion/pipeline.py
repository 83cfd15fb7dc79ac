"""Loading a text-to-image diffusers pipeline for training, LoRA on its UNet, and final/.

`load_pipeline(source)` reads a local pipeline directory (or hub id) with
`DiffusionPipeline.from_pretrained`, swaps its scheduler for a `DDIMScheduler` built from the
same config (the sampler whose steps have log-likelihoods, as DDPO and D3PO do) and freezes the
VAE and text encoder. `add_unet_lora` puts peft LoRA adapters on the UNet's attention
projections; `write_final_pipeline` saves the pipeline with the LoRA merged (or the full
trained UNet) atomically, so `DiffusionPipeline.from_pretrained(final)` loads it without peft.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = "pip install 'alignkit[diffusion]' (or pip install 'diffusers>=0.30')"
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def require_diffusers() -> Any:
    """The `diffusers` module, or one ImportError line with the pip command when it is missing."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"diffusion training needs diffusers: {INSTALL_HINT}") from None
    return diffusers


def load_pipeline(source: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The pipeline at `source` (a diffusers directory or hub id) with a DDIM scheduler, on `device`;
    VAE and text encoder frozen. A directory without model_index.json is a one-line error."""
    diffusers = require_diffusers()
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(f"--model {source}: not a diffusers pipeline directory (no model_index.json); "
                         "save one with pipeline.save_pretrained(DIR)")
    options = {} if dtype == torch.float32 else {"torch_dtype": dtype}  # float32: the saved weights' dtype
    pipeline = diffusers.DiffusionPipeline.from_pretrained(str(source), **options)
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if getattr(pipeline, name, None) is None]
    if missing:
        raise ValueError(f"--model {source}: a {type(pipeline).__name__} without {', '.join(missing)}; "
                         "d3po and prdp train text-to-image UNet pipelines (Stable Diffusion layout)")
    pipeline.scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    for module in (pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipeline


def add_unet_lora(unet, *, rank: int, alpha: int | None = None):
    """`unet` wrapped by peft with LoRA of `rank` on the attention projections (to_q, to_k, to_v,
    to_out.0; alpha defaults to rank, scale 1, as diffusers' SD LoRA scripts); only adapter
    weights train. Returns the `PeftModel` (call it like the UNet; `disable_adapter()` is the
    frozen reference)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"--lora-r must be >= 1 for LoRA on the UNet, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=list(UNET_LORA_TARGETS))
    return get_peft_model(unet, config)


def plain_unet(unet):
    """The trained UNet as a plain diffusers model: a LoRA-merged copy of a PeftModel, else itself."""
    if hasattr(unet, "merge_and_unload"):
        return copy.deepcopy(unet).merge_and_unload()
    return unet


def write_final_pipeline(pipeline, unet, final_dir: Path) -> Path:
    """Save `pipeline` with `unet` (LoRA merged) to `final_dir` as safetensors, atomically (a
    temporary sibling directory renamed into place)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=".tmp-final-"))
    trained = plain_unet(unet)
    original = pipeline.unet
    try:
        pipeline.unet = trained
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pipeline.unet = original
    return final_dir
