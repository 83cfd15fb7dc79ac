"""The TRL side of `bench/grpo_vs_trl.py --whole-process`: the GRPO training script a TRL user
would write, with the same knobs as `alignkit train grpo` (model, JSONL prompts, a rule reward
from a Python file, prompts per step x group size, completion length, steps, constant learning
rate, beta, clip 0.2, group-std scaling, temperature 1, float32 on CPU; one generation per
optimizer step) and TRL's defaults for everything else. It imports nothing from alignkit.

    python bench/trl_grpo_script.py --model DIR --data prompts.jsonl --reward reward.py:count_e
"""

from __future__ import annotations

import argparse
import importlib.util


def load_function(spec: str):
    """`file.py:function` -> the function."""
    path, name = spec.rsplit(":", 1)
    module_spec = importlib.util.spec_from_file_location("bench_reward", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--reward", required=True, help="file.py:function")
    parser.add_argument("--output", required=True)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-gc", action="store_true", help="turn off TRL's default gradient checkpointing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = load_dataset("json", data_files=args.data, split="train")
    samples = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=args.output, per_device_train_batch_size=samples, num_generations=args.group_size,
        steps_per_generation=1, num_iterations=1, max_completion_length=args.max_new_tokens,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        beta=args.beta, loss_type="grpo", temperature=1.0, epsilon=0.2, scale_rewards="group",
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
        seed=args.seed, disable_tqdm=True, **({"gradient_checkpointing": False} if args.no_gc else {}),
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[load_function(args.reward)], args=config,
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(f"{args.output}/final")
    tokenizer.save_pretrained(f"{args.output}/final")


if __name__ == "__main__":
    main()
