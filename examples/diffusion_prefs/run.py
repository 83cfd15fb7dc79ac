"""Before/after images of reward fine-tuning a text-to-image pipeline with prdp (or d3po).

    python examples/diffusion_prefs/run.py                       # tiny random pipeline, seconds on a CPU
    python examples/diffusion_prefs/run.py --model DIR --steps 200 --num-steps 20 --guidance 5 \\
        --reward aesthetic --lr 3e-4 --batch-size 4              # a real Stable Diffusion directory

Writes OUT/grid.png (top row: the pipeline before, bottom row: after; the same noise per
column), OUT/results.json (mean reward of those images before and after) and the run directory
OUT/run (metrics.jsonl, config.yaml, final/). Without --model it builds the tiny pipeline of
alignkit.testing_diffusion at 4x4 pixels (upscaled in the grid) and trains its whole UNet; with
--model it trains LoRA on the UNet (the default) unless --full.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import alignkit
from alignkit.diffusion.pipeline import load_pipeline
from alignkit.diffusion.rewards import load_image_reward
from alignkit.diffusion.sampling import decode_images, encode_prompts, sample_chains
from alignkit.testing_diffusion import build_tiny_pipeline

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a horse", "a photo of a fox"]


def sample_images(pipeline_dir: Path, prompts: list[str], num_steps: int, guidance: float, seed: int) -> list:
    pipeline = load_pipeline(pipeline_dir)
    embeds = encode_prompts(pipeline, prompts)
    negative = encode_prompts(pipeline, [""]).expand(len(prompts), -1, -1) if guidance > 1 else None
    chains = sample_chains(pipeline, pipeline.unet, embeds, num_steps=num_steps, eta=1.0,
                           generator=torch.Generator().manual_seed(seed), negative_embeds=negative,
                           guidance_scale=guidance)
    return decode_images(pipeline, chains.latents[:, -1])


def grid(rows: list[list], cell: int = 96):
    from PIL import Image

    canvas = Image.new("RGB", (cell * len(rows[0]), cell * len(rows)), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            canvas.paste(image.resize((cell, cell), Image.NEAREST), (c * cell, r * cell))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a diffusers text-to-image pipeline directory (default: a tiny random one)")
    parser.add_argument("--algorithm", default="prdp", choices=["prdp", "d3po"])
    parser.add_argument("--reward", default="redness", help="redness, brightness, aesthetic or file.py:function")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--num-steps", type=int, default=4, help="DDIM steps per image")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--full", action="store_true", help="train every UNet weight instead of LoRA")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--output", default="runs/diffusion_prefs")
    args = parser.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_tiny_pipeline(out / "tiny_pipeline", image_size=4)
    full = args.full or not args.model
    result = alignkit.train(args.algorithm, model=str(model), reward=args.reward, output_dir=out / "run",
                            max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            num_steps=args.num_steps, guidance_scale=args.guidance, overwrite=True,
                            **({"adapter": "none"} if full else {}))
    prompts = PROMPTS * 2
    before = sample_images(model, prompts, args.num_steps, args.guidance, seed=123)
    after = sample_images(result.final_dir, prompts, args.num_steps, args.guidance, seed=123)
    grid([before, after]).save(out / "grid.png")
    reward = load_image_reward(args.reward)
    scores = {"before": sum(reward(prompts, before)) / len(prompts), "after": sum(reward(prompts, after)) / len(prompts)}
    (out / "results.json").write_text(json.dumps({"reward": args.reward, "algorithm": args.algorithm,
                                                  "steps": args.steps, **scores}, indent=2) + "\n")
    print(f"{args.reward}: before {scores['before']:.3f}, after {scores['after']:.3f}; grid: {out / 'grid.png'}")


if __name__ == "__main__":
    main()
