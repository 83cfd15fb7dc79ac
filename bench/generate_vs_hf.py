"""Sampling throughput: alignkit's HFEngine against HF `model.generate`, same model and batch.

Both sample `--prompts` prompts x `--group-size` responses of exactly `--max-new-tokens`
tokens (EOS disabled on both sides: `eos_token_id=None` for HF, `ignore_eos` and no stop ids
for ours) at temperature 1 with the same top-k / top-p. Rounds alternate A/B so drifting
machine load hits both; the medians are reported.

    python bench/generate_vs_hf.py                       # random Llama, hidden 256, 4 layers
    python bench/generate_vs_hf.py --model path/to/dir   # any local causal LM
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from alignkit.rollout import HFEngine, SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local model dir (default: build a random tiny Llama)")
    parser.add_argument("--hidden-size", type=int, default=256, help="random model width")
    parser.add_argument("--num-layers", type=int, default=4, help="random model depth")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts per batch")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (n)")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens sampled per row")
    parser.add_argument("--top-k", type=int, default=0, help="top-k for both (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p for both")
    parser.add_argument("--repeats", type=int, default=3, help="timed A/B rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (bf16 on GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    path = args.model
    if path is None:
        from alignkit.testing import build_tiny_model

        path = build_tiny_model(
            tempfile.mkdtemp(prefix="bench-model-"),
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=max(1, args.hidden_size // 64),
        )
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(args.device).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args)
    config = model.config
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    vocab = config.vocab_size
    prompts = torch.randint(4, vocab, (args.prompts, args.prompt_len)).tolist()
    rows = args.prompts * args.group_size
    tokens_per_call = rows * args.max_new_tokens

    generation_config = copy.deepcopy(model.generation_config)
    generation_config.update(
        eos_token_id=None,  # never stop early: both sides produce exactly max_new_tokens
        pad_token_id=pad_id,
        do_sample=True,
        temperature=1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        num_return_sequences=args.group_size,
        max_new_tokens=args.max_new_tokens,
    )
    input_ids = torch.tensor(prompts, device=args.device)

    def run_hf() -> int:
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=generation_config,
            )
        return (output.shape[1] - args.prompt_len) * output.shape[0]

    engine = HFEngine(model, pad_id=pad_id, eos_ids=())
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        top_p=args.top_p,
        ignore_eos=True,
        seed=args.seed,
    )

    def run_ours() -> int:
        return int(engine.generate(prompts, args.group_size, sampling).lengths.sum().item())

    runners = {"hf_generate": run_hf, "alignkit": run_ours}
    for runner in runners.values():  # warm-up (allocator, kernels, lazy imports)
        runner()
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            synchronize(args.device)
            started = time.perf_counter()
            produced = runner()
            synchronize(args.device)
            seconds = time.perf_counter() - started
            if produced != tokens_per_call:
                raise RuntimeError(f"{name} produced {produced} tokens, expected {tokens_per_call}")
            rates[name].append(produced / seconds)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model={args.model or 'random-llama'} params={params / 1e6:.1f}M device={args.device} "
        f"dtype={next(model.parameters()).dtype} threads={torch.get_num_threads()}"
    )
    print(
        f"prompts={args.prompts} group={args.group_size} prompt_len={args.prompt_len} "
        f"new_tokens={args.max_new_tokens} top_k={args.top_k} top_p={args.top_p} "
        f"repeats={args.repeats}"
    )
    for name, values in rates.items():
        rounds = " ".join(f"{value:.0f}" for value in values)
        print(f"{name:12s} median {statistics.median(values):9.1f} tokens/s  (rounds: {rounds})")
    ratio = statistics.median(rates["alignkit"]) / statistics.median(rates["hf_generate"])
    print(f"ratio alignkit / hf_generate = {ratio:.2f}x")


if __name__ == "__main__":
    main()
