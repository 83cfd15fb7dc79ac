"""A tiny text-to-image diffusion pipeline for tests and demos (nothing fetched from a hub).

`build_tiny_pipeline(path)` writes a Stable-Diffusion-layout directory: a random
`UNet2DConditionModel`, a random `AutoencoderKL`, a `DDIMScheduler`, a tiny random CLIP text
encoder and a `CLIPTokenizer` whose vocabulary is the 256 byte symbols (and their end-of-word
forms) with no merges, written as vocab.json + merges.txt. Callers load it back with
`DiffusionPipeline.from_pretrained` (alignkit.diffusion.pipeline.load_pipeline), i.e. through the
real loading code. Images are 16x16 (latents 8x8) unless asked otherwise, so a whole training
run takes seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

START, END = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for the bytes 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [chr(code) for _, code in sorted(zip(order, codes, strict=True))]


def write_tiny_clip_tokenizer(directory: str | Path, max_length: int = 16):
    """A `CLIPTokenizer` over single byte symbols (and `symbol</w>` at a word's end), no merges;
    saved to `directory` with `save_pretrained` and returned."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols + [s + "</w>" for s in symbols] + [START, END])}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                              model_max_length=max_length, pad_token=END)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_pipeline(path: str | Path, *, image_size: int = 16, seed: int = 0) -> Path:
    """Write a tiny random Stable-Diffusion-style pipeline to `path`; returns `path`.

    VAE: two blocks (4, 8 channels), so latents are image_size / 2 with 4 channels; UNet:
    (8, 16) channels, one cross-attention block, cross-attention width 16; CLIP text encoder:
    2 layers of width 16. The DDIM scheduler keeps `set_alpha_to_one=False` (as Stable
    Diffusion does), so every DDIM step with eta > 0 has a proper Gaussian log-likelihood.
    The VAE decoder's output layer is planted: its green and blue filters are the negated red
    filter, so how red an image is (alignkit.diffusion.rewards.redness) is a strong, smooth
    function of the latents that a few dozen reward-tuning steps can move.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = write_tiny_clip_tokenizer(path / "_tokenizer")
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2, sample_size=image_size,
    )
    with torch.no_grad():  # planted colour: green and blue read the negated features of red
        weight = vae.decoder.conv_out.weight
        weight[1].copy_(-weight[0])
        weight[2].copy_(-weight[0])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    for leftover in (path / "_tokenizer").iterdir():
        leftover.unlink()
    (path / "_tokenizer").rmdir()
    return path


def solid_image(rgb: tuple[int, int, int], size: int = 16):
    """A `size` x `size` PIL image of one colour (test data for image pairs)."""
    from PIL import Image

    return Image.new("RGB", (size, size), rgb)


def write_colour_pairs(directory: str | Path, n: int = 4, size: int = 16) -> Path:
    """`directory/pairs.jsonl` with `n` rows: prompt, image_chosen (a red PNG) and
    image_rejected (a blue PNG), paths relative to the file. Returns the JSONL path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        red, blue = solid_image((200 + i, 30, 30), size), solid_image((30, 30, 200 + i), size)
        red.save(directory / "images" / f"red_{i}.png")
        blue.save(directory / "images" / f"blue_{i}.png")
        rows.append({"prompt": f"a picture number {i}", "image_chosen": f"images/red_{i}.png",
                     "image_rejected": f"images/blue_{i}.png"})
    target = directory / "pairs.jsonl"
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target
