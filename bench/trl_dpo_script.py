"""The TRL side of `bench/dpo_vs_trl.py --whole-process`: the DPO training script a TRL user
would write, with the same knobs as `alignkit train dpo` (model, JSONL pairs, batch, steps,
learning rate with linear decay and no warm-up, beta, max length, seed, float32 on CPU) and
TRL's defaults for everything else. It imports nothing from alignkit.

    python bench/trl_dpo_script.py --model DIR --data pairs.jsonl --output OUT --steps 60
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-gc", action="store_true", help="turn off TRL's default gradient checkpointing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = DPOConfig(
        output_dir=args.output, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, beta=args.beta,
        max_length=args.max_length, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
        bf16=False, fp16=False, seed=args.seed, disable_tqdm=True,
        **({"gradient_checkpointing": False} if args.no_gc else {}),
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(f"{args.output}/final")
    tokenizer.save_pretrained(f"{args.output}/final")


if __name__ == "__main__":
    main()
