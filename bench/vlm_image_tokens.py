"""Cost per image token of an online step on the tiny VLMs (Qwen2-VL, LLaVA): time and peak RSS
of one GRPO-shaped step against the number of image tokens per prompt.

One step = the rollout engine sampling `--prompts` prompts x `--group-size` samples of
`--max-new-tokens` tokens (pixel inputs on the prompt: the vision tower runs once per prompt in
the prefill), then one policy forward + backward over every row through the memory-lean LM
head with each row's pixel inputs (`response_logps`, what the trainer, reference and critic
run). Image tokens are those that carry image features (Qwen2-VL's `<|image_pad|>`, LLaVA's
`<image>`, after the processor's expansion; Qwen2-VL adds 2 markup tokens per image). Their
count grows with the number of images per prompt (`--images`, each image 4 tokens on
Qwen2-VL, 16 on LLaVA); 0 images is the text-only baseline. Each
configuration runs in a fresh child process so its peak RSS is its own; the medians of
`--repeats` timed steps (after one warm-up step) are reported, and the last columns divide the
difference to the baseline by the number of image tokens per prompt.

    python bench/vlm_image_tokens.py                     # both architectures, 0/1/2/4/8 images
    python bench/vlm_image_tokens.py --arch llava --images 0,4,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORKER_ENV, emit_result, peak_rss_mib, print_table, run_worker  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2_vl,llava", help="comma-separated: qwen2_vl, llava")
    parser.add_argument("--images", default="0,1,2,4,8", help="images per prompt, comma-separated")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=32, help="tiny model width")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each child")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(spec: dict) -> dict:
    """Child: build the tiny VLM, time warm-up + `repeats` steps with `images` images per prompt."""
    import torch

    from alignkit.data.image_tokenize import prompt_model_inputs
    from alignkit.models import load_vlm
    from alignkit.rollout import HFEngine, SamplingParams
    from alignkit.testing_vlm import SHAPES, build_tiny_vlm, draw_shape_image
    from alignkit.training.online.images import placeholder_token_ids
    from alignkit.training.online.roles import SequenceBatch, response_logps

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    path = build_tiny_vlm(Path(spec["dir"]) / spec["arch"], spec["arch"], hidden_size=spec["hidden_size"])
    model, processor = load_vlm(str(path), device="cpu", dtype="float32")
    tokenizer = processor.tokenizer
    prompts, inputs = [], []
    for p in range(spec["prompts"]):
        images = [draw_shape_image(SHAPES[(p + k) % len(SHAPES)], "red", (8, 8, 48, 48)) for k in range(spec["images"])]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "Which shapes are in the pictures?"}]
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        ids, model_inputs = prompt_model_inputs(processor, text, images)
        prompts.append(ids)
        inputs.append(model_inputs if images else None)
    image_ids = set(placeholder_token_ids(model.config))  # never sampled
    feature_ids = {getattr(model.config, name, None) for name in ("image_token_id", "image_token_index")}
    image_tokens = sum(token in feature_ids for token in prompts[0])  # the tokens that carry image features
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=[])
    parameters = [p for p in model.parameters() if p.requires_grad]
    generate_s, train_s = [], []
    for step in range(spec["repeats"] + 1):
        sampling = SamplingParams(max_new_tokens=spec["max_new_tokens"], seed=step, ignore_eos=True,
                                  suppress_token_ids=tuple(sorted(image_ids)))
        started = time.perf_counter()
        rollout = engine.generate(prompts, spec["group_size"], sampling,
                                  prompt_inputs=inputs if spec["images"] else None)
        sampled = time.perf_counter()
        batch = SequenceBatch.from_rollout(rollout, tokenizer.pad_token_id)
        logps = response_logps(model, batch)[0]
        (-logps.sum() / batch.response_mask.sum()).backward()
        for parameter in parameters:
            parameter.grad = None
        trained = time.perf_counter()
        if step:  # step 0 warms up allocators and kernels
            generate_s.append(sampled - started)
            train_s.append(trained - sampled)
    return {"image_tokens": image_tokens, "prompt_tokens": len(prompts[0]),
            "generate_s": statistics.median(generate_s), "train_s": statistics.median(train_s),
            "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    args = parse_args()
    if args.worker:
        emit_result(worker(json.loads(Path(args.spec).read_text())))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for arch in args.arch.split(","):
            baseline = None
            for images in (int(k) for k in args.images.split(",")):
                spec = {"arch": arch, "images": images, "prompts": args.prompts, "group_size": args.group_size,
                        "max_new_tokens": args.max_new_tokens, "hidden_size": args.hidden_size,
                        "repeats": args.repeats, "threads": args.threads, "dir": scratch}
                spec_file = Path(scratch) / f"{arch}-{images}.json"
                spec_file.write_text(json.dumps(spec))
                result = run_worker(__file__, f"{arch}-{images}", spec_file, timeout=900,
                                    env={**WORKER_ENV, "OMP_NUM_THREADS": str(args.threads)})
                step_s = result["generate_s"] + result["train_s"]
                if baseline is None:
                    baseline = (step_s, result["peak_rss_mib"], result["image_tokens"])
                extra = result["image_tokens"] - baseline[2]
                per_token_ms = (step_s - baseline[0]) * 1e3 / extra if extra else None
                per_token_mib = (result["peak_rss_mib"] - baseline[1]) / extra if extra else None
                rows.append([arch, images, result["image_tokens"], result["prompt_tokens"],
                             result["generate_s"] * 1e3, result["train_s"] * 1e3, step_s * 1e3,
                             result["peak_rss_mib"], per_token_ms, per_token_mib])
                print(f"{arch} images={images}: {json.dumps(result)}", file=sys.stderr, flush=True)
    print_table(["arch", "images", "image tok", "prompt tok", "generate ms", "fwd+bwd ms", "step ms",
                 "peak RSS MiB", "ms / image tok", "MiB / image tok"], rows,
                title=f"one step: {args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} "
                      f"new tokens, then forward + backward over every row (hidden {args.hidden_size}, "
                      f"{args.threads} thread(s), median of {args.repeats})")


if __name__ == "__main__":
    main()
