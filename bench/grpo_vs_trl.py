"""GRPO training throughput and memory: alignkit against TRL's GRPOTrainer, side by side.

Same model, prompts, rule reward (count of the letter "e"), prompts per step, group size,
completion length, temperature 1, learning rate (constant), beta (KL to the reference, k3 in
the loss for both), clip epsilon 0.2, rewards scaled by the group std (TRL scale_rewards=
"group") and GRPO's per-sequence token-mean loss (TRL loss_type="grpo"), float32 on CPU.
Prompts are plain text (no chat template on either side) and far below any length cap.

Model (default): a random Llama with SmolLM2-135M's shape -- its 49,152-token vocabulary
(tied embeddings), GQA, 8/3 MLP -- but `--hidden-size` 256 and `--num-layers` 4, saved with
SmolLM2's tokenizer when `~/.cache/alignkit/smollm2-135m-instruct` exists (else a tiny BPE
tokenizer padded to 49,152 ids; see `_common.build_smollm2_shaped`). A realistic vocabulary
matters: the (tokens x vocab) LM-head work dominates at this size, as in real small models.
`--model smollm2` uses the real SmolLM2-135M-Instruct (30 layers; slow on CPU); `--model DIR`
any local model. Random weights rarely emit EOS, so completions run to `--max-new-tokens`. One generation per optimizer step on both sides
(TRL steps_per_generation=1, num_iterations=1: exactly on-policy). Each framework runs in a
fresh child process (this script with `--worker NAME`), in alternating A/B order over
`--rounds`; medians are reported.

    python bench/grpo_vs_trl.py                        # SmolLM2-shaped, 8 prompts x 8, 64 tokens
    python bench/grpo_vs_trl.py --model smollm2 --steps 3
    python bench/grpo_vs_trl.py --steps 4 --rounds 1   # quick smoke run

Measured per child: `steps/s` over the loop without step 1 (warm-up), `tokens/s` = generated
completion tokens per second of that loop (each side's own completion lengths, from its logs),
`e2e` = load + train + save, `peak RSS` (ru_maxrss) and `RSS base` (after importing torch +
transformers). Children run with `--threads` torch threads (default 1: stable on a shared box).
TRL keeps its default gradient checkpointing (as bench/dpo_vs_trl.py) unless `--trl-no-gc`.

`--whole-process` times what a user's stopwatch sees instead: `alignkit train grpo ...` as a
subprocess against `bench/trl_grpo_script.py` (the equivalent TRL script) as a subprocess,
each at its default thread count (alignkit auto, torch's default for TRL; `--threads N` pins
both), `--rounds` alternating runs each, median wall seconds, CPU seconds and peak RSS
(`os.wait4`), and the ratios. Default workload: a random tiny Llama (hidden 256 x 4 layers)
with a 2,048-token vocabulary, prompts of 8-24 words, 4 prompts x 8 samples x 24 new tokens
per step, 60 steps, the letter-e reward from a file (`bench/_whole.py`):

    python bench/grpo_vs_trl.py --whole-process --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WORKER_ENV,
    build_smollm2_shaped,
    current_rss_mib,
    emit_result,
    median_of,
    peak_rss_mib,
    print_table,
    ratio,
    run_rounds,
    run_worker,
    smollm2_dir,
)

FRAMEWORKS = ("alignkit", "trl")
PROMPTS = ["Write a short review.", "The movie", "Tell me about the film.", "What is two plus two?",
           "Please answer the question briefly.", "The story", "I loved the music", "The quick brown fox"]


def count_e(prompts, completions, **kwargs):
    """The shared reward: +1 per letter e in the completion."""
    return [float(str(text).count("e")) for text in completions]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="smollm2 (cached SmolLM2-135M-Instruct) or a local model dir "
                        "(default: build a random SmolLM2-shaped Llama)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=None, help="default 8 (4 with --whole-process)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (24 with --whole-process)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (>= 2; default 6, 60 with "
                        "--whole-process)")
    parser.add_argument("--whole-process", action="store_true",
                        help="time `alignkit train grpo` against the TRL script end to end, as subprocesses")
    parser.add_argument("--vocab-size", type=int, default=2048, help="--whole-process model vocabulary")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per child (default 1; --whole-process: each side's own default)")
    parser.add_argument("--trl-no-gc", action="store_true",
                        help="turn off TRL's default gradient checkpointing (alignkit never checkpoints here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    whole = args.whole_process
    for name, loop_default, whole_default in (("steps", 6, 60), ("prompts_per_step", 8, 4),
                                              ("max_new_tokens", 64, 24), ("threads", 1, 0)):
        if getattr(args, name) is None:
            setattr(args, name, whole_default if whole else loop_default)
    if args.steps < 2 and not args.worker:
        parser.error("--steps must be at least 2 (step 1 is the excluded warm-up)")
    return args


def loop_stats(stamps: list[float], lengths: list[float], spec: dict) -> dict:
    measured = len(stamps) - 1
    loop_s = stamps[-1] - stamps[0]
    samples = spec["prompts_per_step"] * spec["group_size"]
    return {"steps": len(stamps), "loop_s": loop_s, "steps_per_s": measured / loop_s,
            "tokens_per_s": sum(lengths[1:]) * samples / loop_s,
            "mean_completion_length": statistics.mean(lengths) if lengths else None}


def worker_alignkit(spec: dict) -> dict:
    import alignkit
    import alignkit.training.online.loop  # noqa: F401

    stamps, lengths, rewards = [], [], []

    def on_step(step: int, metrics: dict) -> None:
        stamps.append(time.perf_counter())
        lengths.append(float(metrics["response_length"]))
        rewards.append(float(metrics["reward/mean"]))

    # `alignkit_settings` (bench/grpo_losses_vs_trl.py) overrides the GRPO loss choices below
    settings = dict(beta=spec["beta"], temperature=1.0, eps_low=0.2, scale_by_std=True)
    settings.update(spec.get("alignkit_settings", {}))
    begin = time.perf_counter()
    alignkit.train(
        "grpo", model=spec["model"], data=[{"prompt": p} for p in PROMPTS], output_dir=spec["out"],
        reward=count_e, callbacks=(on_step,), batch_size=spec["prompts_per_step"], max_steps=spec["steps"],
        lr=spec["lr"], warmup_ratio=0.0, scheduler="constant", seed=spec["seed"], dtype="float32",
        device="cpu", progress=False, group_size=spec["group_size"], max_new_tokens=spec["max_new_tokens"],
        **settings,
    )
    return {"end_to_end_s": time.perf_counter() - begin, **loop_stats(stamps, lengths, spec),
            "first_reward": rewards[0], "final_reward": rewards[-1]}


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    stamps, lengths, rewards = [], [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))
                rewards.append(float(logs.get("reward", float("nan"))))

    begin = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    samples = spec["prompts_per_step"] * spec["group_size"]
    # `trl_settings` (bench/grpo_losses_vs_trl.py) overrides the loss choices (loss_type, epsilons, ...)
    loss = dict(beta=spec["beta"], loss_type="grpo", temperature=1.0, epsilon=0.2, scale_rewards="group")
    loss.update(spec.get("trl_settings", {}))
    config = GRPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=samples, num_generations=spec["group_size"],
        steps_per_generation=1, num_iterations=1, max_completion_length=spec["max_new_tokens"],
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
        dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True,
        **({"gradient_checkpointing": False} if spec["trl_no_gc"] else {}), **loss,
    )
    dataset = Dataset.from_list([{"prompt": p} for p in PROMPTS] * spec["steps"])
    trainer = GRPOTrainer(model=model, reward_funcs=[count_e], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "final"))
    return {"end_to_end_s": time.perf_counter() - begin, **loop_stats(stamps, lengths, spec),
            "gradient_checkpointing": bool(config.gradient_checkpointing),
            "first_reward": rewards[0] if rewards else None, "final_reward": rewards[-1] if rewards else None}


def run_as_worker(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    import torch
    import transformers  # noqa: F401

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    rss_base = current_rss_mib()
    result = worker_alignkit(spec) if args.worker == "alignkit" else worker_trl(spec)
    result.update(peak_rss_mib=peak_rss_mib(), rss_base_mib=rss_base, framework=args.worker,
                  torch_threads=torch.get_num_threads())
    emit_result(result)


def main() -> None:
    args = parse_args()
    if args.worker:
        run_as_worker(args)
        return
    if args.whole_process:
        whole_process(args)
        return
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    os.environ.update(WORKER_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    model_dir = args.model
    if model_dir == "smollm2":
        model_dir = smollm2_dir()
        if model_dir is None:
            sys.exit("--model smollm2: no ~/.cache/alignkit/smollm2-135m-instruct; create it with "
                     "alignkit.models.resolve_model_path('smollm2-135m')")
    elif model_dir is None:
        model_dir = build_smollm2_shaped(workdir / "model", hidden_size=args.hidden_size,
                                         num_layers=args.num_layers, num_heads=args.num_heads,
                                         num_kv_heads=args.num_kv_heads, seed=args.seed)
    spec = {"model": str(model_dir), "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens, "steps": args.steps, "lr": args.lr, "beta": args.beta,
            "seed": args.seed, "threads": args.threads, "trl_no_gc": args.trl_no_gc}
    print(f"model {spec['model']}; {args.prompts_per_step} prompts x {args.group_size} samples per step, "
          f"{args.max_new_tokens} new tokens, {args.steps} steps, beta {args.beta}, torch threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.2f}")

    def run_one(name: str, round_index: int) -> dict:
        out = workdir / f"{name}-{round_index}"
        spec_path = workdir / f"spec-{name}-{round_index}.json"
        spec_path.write_text(json.dumps({**spec, "out": str(out)}))
        env = {"HF_DATASETS_CACHE": str(out / "hf-datasets")}
        if args.threads > 0:
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        return run_worker(__file__, name, spec_path, timeout=args.timeout, env=env, verbose=args.verbose)

    results = run_rounds(names, args.rounds, run_one, log=lambda s: print(s, flush=True))
    keys = ("steps_per_s", "tokens_per_s", "loop_s", "end_to_end_s", "peak_rss_mib", "rss_base_mib",
            "mean_completion_length", "first_reward", "final_reward")
    medians = {n: {k: median_of(results[n], k) for k in keys} for n in names}
    print_table(["framework", "steps/s", "tokens/s", "loop s", "e2e s", "peak RSS MiB", "RSS base MiB",
                 "mean len", "reward 1st", "reward last"],
                [[n, *(m[k] for k in keys)] for n, m in medians.items()],
                title=f"medians over {args.rounds} round(s); load average now {os.getloadavg()[0]:.2f}")
    ratios = {}
    if "alignkit" in medians and "trl" in medians:
        ours, theirs = medians["alignkit"], medians["trl"]
        ratios = {"steps_per_s": ratio(ours["steps_per_s"], theirs["steps_per_s"]),
                  "tokens_per_s": ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
                  "end_to_end_speedup": ratio(theirs["end_to_end_s"], ours["end_to_end_s"]),
                  "peak_rss": ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"])}
        print_table(["pair", "steps/s", "tokens/s", "e2e speed-up", "peak RSS"],
                    [["alignkit / trl", *ratios.values()]],
                    title="ratios (speed: >1 = alignkit faster; memory: <1 = alignkit smaller)")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "runs": results, "medians": medians,
                                               "ratios": ratios}, indent=2))


def whole_process(args: argparse.Namespace) -> None:
    """`alignkit train grpo` against `trl_grpo_script.py`, both timed end to end as subprocesses."""
    from _whole import (
        BENCH_DIR,
        REWARD_FILE,
        alignkit_command,
        bench_model,
        run_whole,
        whole_report,
        word_prompts,
        write_jsonl,
    )

    os.environ.update(WORKER_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="bench-grpo-whole-"))
    model = bench_model(args, workdir)
    n_prompts = args.prompts_per_step * args.steps
    data = write_jsonl(workdir / "prompts.jsonl", word_prompts(n_prompts, seed=args.seed))
    reward_file = workdir / "reward.py"
    reward_file.write_text(REWARD_FILE)
    reward = f"{reward_file}:count_e"
    threads = [] if args.threads == 0 else ["--threads", str(args.threads)]
    print(f"whole process: model {model}; {n_prompts} prompts (8-24 words), {args.prompts_per_step} prompts x "
          f"{args.group_size} samples x {args.max_new_tokens} new tokens, {args.steps} steps, beta {args.beta}; "
          f"threads {args.threads or 'each side its default'}; TRL gradient checkpointing "
          f"{'off' if args.trl_no_gc else 'on (its default)'}; load average {os.getloadavg()[0]:.2f}; "
          f"logs in {workdir}", flush=True)

    def alignkit_run(run: int):
        cmd = [*alignkit_command(), "train", "grpo", "--model", model, "--data", str(data), "--reward", reward,
               "--output", str(workdir / f"alignkit-{run}"), "--batch-size", str(args.prompts_per_step),
               "--max-steps", str(args.steps), "--lr", str(args.lr), "--warmup-ratio", "0",
               "--scheduler", "constant", "--seed", str(args.seed), "--dtype", "float32", "--device", "cpu",
               "--no-progress", "--set", f"group_size={args.group_size}",
               "--set", f"max_new_tokens={args.max_new_tokens}", "--set", f"beta={args.beta}",
               "--set", "temperature=1.0", "--set", "eps_low=0.2", "--set", "scale_by_std=true", *threads]
        return cmd, {}

    def trl_run(run: int):
        out = workdir / f"trl-{run}"
        cmd = [sys.executable, str(BENCH_DIR / "trl_grpo_script.py"), "--model", model, "--data", str(data),
               "--reward", reward, "--output", str(out), "--prompts-per-step", str(args.prompts_per_step),
               "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
               "--steps", str(args.steps), "--lr", str(args.lr), "--beta", str(args.beta), "--seed", str(args.seed),
               *(["--no-gc"] if args.trl_no_gc else []), *threads]
        return cmd, {"HF_DATASETS_CACHE": str(out / "hf-datasets")}

    results = run_whole({"alignkit": alignkit_run, "trl": trl_run}, args.rounds, workdir, args.timeout,
                        log=lambda line: print(line, flush=True))
    summary = whole_report(results, "alignkit", "trl")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": {"model": model, "prompts": n_prompts,
                                                            "steps": args.steps}, "runs": results, **summary},
                                              indent=2))


if __name__ == "__main__":
    main()
