"""GRPO-family policy losses, alignkit against TRL's GRPOTrainer, one loss at a time.

For each loss both sides train the same model on the same prompts and rule reward (letter-e
count), with the same prompts per step, group size, completion length, steps, learning rate,
beta and float32 on CPU: the workers of `bench/grpo_vs_trl.py`, with the loss settings below
laid over its GRPO ones (one generation per optimizer step: exactly on-policy on both sides).

| loss      | alignkit (--set ...)                              | TRL GRPOConfig                                              |
|-----------|---------------------------------------------------|-------------------------------------------------------------|
| grpo      | grpo preset (ppo_clip 0.2, seq_mean_token_mean)   | loss_type="grpo", epsilon=0.2                               |
| dapo-loss | aggregation=token_mean, eps_high=0.28             | loss_type="dapo", epsilon=0.2, epsilon_high=0.28            |
| gspo      | policy_loss=gspo (gspo_eps_low/high 3e-4 / 4e-4)  | importance_sampling_level="sequence", loss_type="grpo",     |
|           |                                                   | epsilon=3e-4, epsilon_high=4e-4 (set here: TRL has no GSPO  |
|           |                                                   | defaults, its epsilon stays 0.2)                            |
| cispo     | policy_loss=cispo, cispo_max=5, token_mean        | loss_type="cispo", epsilon_high=5.0 (an absolute cap on the |
|           |                                                   | weight there; left unset it would be epsilon = 0.2)         |
| sapo      | policy_loss=sapo (tau 1.0 / 1.05)                 | loss_type="sapo" (temperatures 1.0 / 1.05)                  |

`dapo-loss` is DAPO's loss only (token-mean aggregation, clip-higher), not the dapo preset: its
dynamic sampling would change the work per step. A loss whose settings TRL's GRPOConfig lacks
(no such field, or a loss_type / importance_sampling_level its help does not list) is reported
and skipped.

Default model: a random Llama (hidden 256 x 4 layers) with a 2,048-token vocabulary
(`_whole.build_vocab_llama`), 4 prompts x 8 samples x 24 new tokens per step, 8 steps, one
round: all five losses in a few minutes on 2 cores.

Reported per loss and framework: train-loop steps/s (end-of-step stamps, step 1 excluded),
peak RSS (ru_maxrss of the child), and the whole-process wall time: the child process from
spawn to exit (interpreter start, imports, model load, training, save), what a stopwatch
around `python train.py` sees.

    python bench/grpo_losses_vs_trl.py
    python bench/grpo_losses_vs_trl.py --losses gspo,cispo --steps 8 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_vs_trl  # noqa: E402
from _common import (  # noqa: E402
    WORKER_ENV,
    child_env,
    first_error,
    median_of,
    print_table,
    ratio,
    run_rounds,
    run_worker,
)
from _whole import build_vocab_llama  # noqa: E402

FRAMEWORKS = ("alignkit", "trl")
LOSSES: dict[str, dict[str, dict]] = {
    "grpo": {"alignkit": {}, "trl": {"loss_type": "grpo"}},
    "dapo-loss": {"alignkit": {"aggregation": "token_mean", "eps_high": 0.28},
                  "trl": {"loss_type": "dapo", "epsilon_high": 0.28}},
    "gspo": {"alignkit": {"policy_loss": "gspo", "gspo_eps_low": 3e-4, "gspo_eps_high": 4e-4},
             "trl": {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4,
                     "epsilon_high": 4e-4}},
    "cispo": {"alignkit": {"policy_loss": "cispo", "cispo_max": 5.0, "aggregation": "token_mean"},
              "trl": {"loss_type": "cispo", "epsilon_high": 5.0}},
    "sapo": {"alignkit": {"policy_loss": "sapo", "sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05},
             "trl": {"loss_type": "sapo", "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}},
}
# GRPOConfig fields whose value must be one of the strings their help text lists
LISTED_VALUES = ("loss_type", "importance_sampling_level")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {', '.join(LOSSES)}")
    parser.add_argument("--model", help="a local model dir (default: a random 2k-vocabulary Llama)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (>= 2; step 1 is the warm-up)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--trl-no-gc", action="store_true", help="turn off TRL's default gradient checkpointing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.losses.split(",") if name not in LOSSES]
    if unknown:
        parser.error(f"--losses: unknown {', '.join(unknown)}; choose from {', '.join(LOSSES)}")
    if args.steps < 2 and not args.worker:
        parser.error("--steps must be at least 2 (step 1 is the excluded warm-up)")
    return args


def trl_lacks(settings: dict) -> str | None:
    """Why TRL's GRPOConfig cannot express `settings` (a missing field, or a string value its
    help does not list), or None when it can."""
    from trl import GRPOConfig

    fields = {field.name: field for field in dataclasses.fields(GRPOConfig)}
    for key, value in settings.items():
        if key not in fields:
            return f"GRPOConfig has no field {key!r}"
        if key in LISTED_VALUES and f"'{value}'" not in fields[key].metadata.get("help", ""):
            return f"GRPOConfig.{key} does not list {value!r}"
    return None


def main() -> None:
    args = parse_args()
    if args.worker:
        grpo_vs_trl.run_as_worker(args)
        return
    import trl

    os.environ.update(WORKER_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="bench-grpo-losses-"))
    model = args.model or str(build_vocab_llama(workdir / "model", vocab_size=args.vocab_size,
                                                hidden_size=args.hidden_size, num_layers=args.num_layers,
                                                num_heads=args.num_heads, seed=args.seed))
    spec = {"model": model, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens, "steps": args.steps, "lr": args.lr, "beta": args.beta,
            "seed": args.seed, "threads": args.threads, "trl_no_gc": args.trl_no_gc}
    print(f"model {model}; {args.prompts_per_step} prompts x {args.group_size} samples x {args.max_new_tokens} "
          f"new tokens per step, {args.steps} steps, beta {args.beta}, {args.rounds} round(s), torch threads "
          f"{args.threads}; TRL {trl.__version__} (gradient checkpointing "
          f"{'off' if args.trl_no_gc else 'on, its default'}); load average {os.getloadavg()[0]:.2f}", flush=True)

    medians, skipped, runs = {}, {}, {}
    for loss in args.losses.split(","):
        reason = trl_lacks(LOSSES[loss]["trl"])
        if reason:
            skipped[loss] = f"TRL {trl.__version__} lacks it: {reason}"
            print(f"{loss}: skipped ({skipped[loss]})", flush=True)
            continue

        def run_one(name: str, round_index: int, loss: str = loss) -> dict:
            out = workdir / f"{loss}-{name}-{round_index}"
            spec_path = workdir / f"spec-{loss}-{name}-{round_index}.json"
            spec_path.write_text(json.dumps({**spec, "out": str(out), "alignkit_settings": LOSSES[loss]["alignkit"],
                                             "trl_settings": LOSSES[loss]["trl"]}))
            return run_worker(__file__, name, spec_path, timeout=args.timeout, env=child_env(args.threads, out),
                              verbose=args.verbose)

        print(f"{loss}: alignkit {LOSSES[loss]['alignkit'] or 'grpo preset'} | TRL {LOSSES[loss]['trl']}", flush=True)
        runs[loss] = run_rounds(FRAMEWORKS, args.rounds, run_one, log=lambda s: print("  " + s, flush=True),
                                keep_going=True)
        for name in FRAMEWORKS:
            error = first_error(runs[loss][name])
            if error:
                skipped[f"{loss} ({name})"] = f"failed: {error}"
        medians[loss] = {name: {key: median_of(runs[loss][name], key)
                                for key in ("steps_per_s", "peak_rss_mib", "process_wall_s", "end_to_end_s")}
                         for name in FRAMEWORKS}
    report(medians, skipped, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "losses": LOSSES, "runs": runs, "medians": medians,
                                               "skipped": skipped}, indent=2))


def report(medians: dict, skipped: dict, rounds: int) -> None:
    """Two tables: the train loop (steps/s, peak RSS) and the whole process (wall seconds)."""
    loop_rows, wall_rows = [], []
    for loss, by in medians.items():
        ours, theirs = by["alignkit"], by["trl"]
        loop_rows.append([loss, ours["steps_per_s"], theirs["steps_per_s"],
                          ratio(ours["steps_per_s"], theirs["steps_per_s"]), ours["peak_rss_mib"],
                          theirs["peak_rss_mib"], ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"])])
        wall_rows.append([loss, ours["process_wall_s"], theirs["process_wall_s"],
                          ratio(theirs["process_wall_s"], ours["process_wall_s"]), ours["end_to_end_s"],
                          theirs["end_to_end_s"]])
    print_table(["loss", "alignkit steps/s", "TRL steps/s", "ratio", "alignkit peak RSS MiB", "TRL peak RSS MiB",
                 "RSS ratio"], loop_rows,
                title=f"train loop, step 1 excluded (medians of {rounds} round(s); ratio > 1: alignkit faster; "
                      f"RSS ratio < 1: alignkit smaller); load average now {os.getloadavg()[0]:.2f}")
    print_table(["loss", "alignkit process wall s", "TRL process wall s", "speed-up", "alignkit load+train+save s",
                 "TRL load+train+save s"], wall_rows,
                title="whole process: child spawn to exit (interpreter start, imports, model load, train, save), "
                      "what a stopwatch sees; speed-up = TRL wall / alignkit wall")
    for loss, reason in skipped.items():
        print(f"skipped {loss}: {reason}")


if __name__ == "__main__":
    main()
