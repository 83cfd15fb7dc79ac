"""Arithmetic with a calculator tool on SmolLM2-135M-Instruct, before and after GRPO (issue 15).

Every model is measured the same way: the held-out questions (heldout.jsonl) played as
conversations on alignkit's episode runner (`alignkit.agents.episodes.EpisodeRunner` on
`alignkit.rollout.HFEngine`, the runner and engine training uses) with the calculator tool
(`--tools alignkit.agents.example_tools:calculator`), greedy decoding, at most `max_turns`
policy turns. Per episode:

- called:  the policy made at least one tool call (well-formed or not);
- valid:   at least one call got a result (a tool reply that is not "Error: ...");
- correct: the final answer contains the right number (reward.py:correct, the training reward).

Each rate comes with its Wilson 95% interval and a bootstrap 95% interval over questions
(`alignkit.eval.stats`); the accuracy change on the same questions with a paired bootstrap.

Phases (each timed), `--paths base,warm` by default:
  base:       the embedded SmolLM2-135M-Instruct, measured;
  grpo:       `alignkit train grpo --tools ... --reward reward.py:correct` from the base model, measured;
  warm:       `alignkit train filtered_bc` on warmstart.jsonl (16 tool-use dialogues, every
              assistant turn trained) from the base model, measured (the base model writes
              no well-formed call, see README.md);
  warm+grpo:  GRPO as above from the warm-started model, measured.

    python examples/calculator_tools/run.py                    # the reported run (~16 min, 2 shared cores)
    python examples/calculator_tools/run.py --paths warm       # the warm-start path only
    python examples/calculator_tools/run.py --dry-run          # a tiny random model, seconds

results.json gets every number; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def example_module(name: str):
    """This example's own `NAME.py`, imported by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"calculator_tools_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


correct = example_module("reward").correct
TOOLS = "alignkit.agents.example_tools:calculator"
REWARD_SPEC = f"{HERE / 'reward.py'}:correct"
RATES = ("called", "valid", "correct")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- measuring


def episode_outcomes(messages: list[list[dict]], final_answers: list[str], rows: list[dict]) -> dict[str, list[int]]:
    """Per episode 0/1: called (>= 1 tool call), valid (>= 1 tool result that is not an
    error), correct (reward.py:correct of the final answer)."""
    called = [int(any(m["role"] == "assistant" and m.get("tool_calls") for m in msgs)) for msgs in messages]
    valid = [int(any(m["role"] == "tool" and not m.get("content", "").startswith("Error:") for m in msgs))
             for msgs in messages]
    right = [int(score) for score in correct([], final_answers, [row["answer"] for row in rows], messages)]
    return {"called": called, "valid": valid, "correct": right}


def rate_summary(flags: list[int], seed: int = 0) -> dict[str, Any]:
    """A 0/1 list's rate with its Wilson and bootstrap 95% intervals."""
    from alignkit.eval.stats import bootstrap_ci, wilson_interval

    rate, low, high = wilson_interval(sum(flags), len(flags))
    _, boot_low, boot_high = bootstrap_ci(flags, seed=seed)
    return {"rate": rate, "count": sum(flags), "n": len(flags), "wilson95": [low, high],
            "bootstrap95": [boot_low, boot_high]}


def measure(model_path: str, rows: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Greedy episodes of every row on the episode runner, with the calculator; the rates."""
    import torch

    from alignkit.agents.episodes import EpisodeRunner, EpisodeSettings
    from alignkit.agents.tools import load_tools
    from alignkit.models.loading import load_model
    from alignkit.rollout import HFEngine, SamplingParams
    from alignkit.training.online.roles import eos_ids

    started = time.perf_counter()
    model, tokenizer = load_model(model_path, device="cpu", dtype="float32")
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids(tokenizer, model),
                      max_batch_size=args.eval_batch)
    settings = EpisodeSettings(max_turns=args.max_turns, max_episode_tokens=args.max_episode_tokens)
    runner = EpisodeRunner(tokenizer, tools=load_tools(TOOLS), settings=settings, env_name="--tools")
    try:
        with torch.inference_mode():
            episodes = runner.run(engine, [{**row, "__row__": i} for i, row in enumerate(rows)], 1,
                                  SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, seed=args.seed))
    finally:
        runner.close()
    outcomes = episode_outcomes(episodes.messages, episodes.final_answers(), rows)
    out: dict[str, Any] = {name: rate_summary(outcomes[name]) for name in RATES}
    out["by_kind"] = {kind: {name: sum(f for f, row in zip(outcomes[name], rows, strict=True) if row["kind"] == kind)
                             / max(1, sum(row["kind"] == kind for row in rows)) for name in RATES}
                      for kind in sorted({row["kind"] for row in rows})}
    out["per_question"] = outcomes
    out["calls_per_episode"] = episodes.metrics["tools/calls_per_episode"]
    out["tool_errors"] = episodes.metrics["tools/errors"]
    out["turns_mean"] = episodes.metrics["turns/mean"]
    out["examples"] = [transcript(msgs) for msgs in episodes.messages[: args.examples]]
    out["wall_s"] = time.perf_counter() - started
    return out


def transcript(messages: list[dict]) -> list[str]:
    """The episode's turns after the system prompt, one line each."""
    return [f"{m['role']}: {m.get('content', '')}" for m in messages if m["role"] != "system"]


# --------------------------------------------------------------------------- training


def warm_start(model: str, output: Path, args: argparse.Namespace) -> dict[str, Any]:
    """filtered_bc (behaviour cloning on every assistant turn) on warmstart.jsonl."""
    import alignkit

    started = time.perf_counter()
    result = alignkit.train("filtered_bc", model=model, data=str(args.warmstart_data), output_dir=output,
                            epochs=args.warm_epochs, batch_size=args.warm_batch, lr=args.warm_lr,
                            max_length=1024,  # the tiny test tokenizer writes the dialogues in ~920 tokens
                            warmup_ratio=0.0, scheduler="constant", progress=False, seed=args.seed)
    seconds = time.perf_counter() - started
    return {"final": str(result.final_dir), "steps": result.steps, "wall_s": seconds,
            "steps_per_s": result.steps / seconds, "last_loss": result.metrics.get("loss")}


def grpo(model: str, output: Path, args: argparse.Namespace) -> dict[str, Any]:
    """GRPO with the calculator tool and the plain correctness reward on train.jsonl."""
    import alignkit

    started = time.perf_counter()
    result = alignkit.train("grpo", model=model, data=str(args.train_data), output_dir=output,
                            reward=REWARD_SPEC, tools=TOOLS, max_steps=args.steps, batch_size=args.batch_size,
                            group_size=args.group_size, max_new_tokens=args.max_new_tokens, lr=args.lr,
                            beta=args.beta, temperature=1.0, max_turns=args.max_turns,
                            max_episode_tokens=args.max_episode_tokens, tool_timeout_s=10.0,
                            warmup_ratio=0.0, scheduler="constant", progress=False, seed=args.seed,
                            allow_degenerate=True)  # all-zero reward groups are a result to report here
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    curve = {key: [row.get(key) for row in rows]
             for key in ("reward/mean", "tools/calls_per_episode", "tools/errors", "turns/mean", "episode/length")}
    return {"final": str(result.final_dir), "steps": result.steps, "wall_s": seconds,
            "steps_per_s": result.steps / seconds, "curve": curve}


# --------------------------------------------------------------------------- report


def table(phases: dict[str, dict[str, Any]]) -> str:
    """One line per measured model: each rate with its Wilson interval, and the wall time."""
    lines = [f"{'model':<10} {'tool-call rate':<22} {'valid-call rate':<22} {'accuracy':<22} {'wall s':>7}"]
    for name, phase in phases.items():
        cells = [f"{phase[r]['rate']:.3f} [{phase[r]['wilson95'][0]:.3f}, {phase[r]['wilson95'][1]:.3f}]"
                 for r in RATES]
        lines.append(f"{name:<10} " + " ".join(f"{c:<22}" for c in cells) + f" {phase['wall_s']:>7.0f}")
    return "\n".join(lines)


def accuracy_change(before: dict[str, Any], after: dict[str, Any]) -> list[float]:
    """(mean, low, high) of after - before accuracy on the same questions, paired bootstrap."""
    from alignkit.eval.stats import paired_bootstrap_diff

    return list(paired_bootstrap_diff(after["per_question"]["correct"], before["per_question"]["correct"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--output", type=Path, default=Path("runs/calculator_tools"))
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--train-data", type=Path, default=HERE / "train.jsonl")
    parser.add_argument("--heldout-data", type=Path, default=HERE / "heldout.jsonl")
    parser.add_argument("--warmstart-data", type=Path, default=HERE / "warmstart.jsonl")
    parser.add_argument("--heldout", type=int, default=32, help="held-out questions measured (first N)")
    parser.add_argument("--paths", type=lambda text: text.split(","), default=["base", "warm"],
                        help="comma-separated: base (GRPO from the base model), warm (filtered_bc warm-start, "
                             "then GRPO from it)")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps")
    parser.add_argument("--batch-size", type=int, default=2, help="GRPO prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="GRPO samples per prompt")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per turn (a call to add three numbers takes ~41)")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-episode-tokens", type=int, default=192)
    parser.add_argument("--warm-epochs", type=int, default=1)
    parser.add_argument("--warm-batch", type=int, default=4)
    parser.add_argument("--warm-lr", type=float, default=5e-5)
    parser.add_argument("--eval-batch", type=int, default=None, help="engine rows decoded together (None: all)")
    parser.add_argument("--examples", type=int, default=4, help="transcripts kept per phase in results.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny random model (alignkit.testing), 4 questions, 1 step: checks the wiring")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.paths) - {"base", "warm"})
    if unknown:
        parser.error(f"--paths: unknown path {', '.join(unknown)}; expected base and/or warm")
    if args.dry_run:
        args.heldout, args.steps, args.batch_size, args.group_size = 4, 1, 2, 2
        args.max_new_tokens, args.max_turns, args.max_episode_tokens, args.examples = 8, 2, 64, 1
        args.warm_batch = 8
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    scratch = None
    if args.dry_run:
        from alignkit.testing import build_tiny_model

        scratch = tempfile.TemporaryDirectory(prefix="calculator-dry-run-")
        args.model = str(build_tiny_model(Path(scratch.name) / "tiny"))
        args.output = Path(scratch.name) / "runs"
    rows = read_jsonl(args.heldout_data)[: args.heldout]
    results: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "reward": "reward.py:correct (1 if the final answer contains the right number)",
                               "measured": {}, "training": {}, "accuracy_change": {}}
    measured, training = results["measured"], results["training"]
    started = time.perf_counter()
    measured["base"] = measure(args.model, rows, args)
    print(f"base: measured in {measured['base']['wall_s']:.0f} s", flush=True)
    for path in args.paths:
        start, name = args.model, "grpo"
        if path == "warm":
            training["warm"] = warm_start(args.model, args.output / "warm", args)
            measured["warm"] = measure(training["warm"]["final"], rows, args)
            print(f"warm: trained in {training['warm']['wall_s']:.0f} s, measured in "
                  f"{measured['warm']['wall_s']:.0f} s", flush=True)
            start, name = training["warm"]["final"], "warm+grpo"
        training[name] = grpo(start, args.output / name.replace("+", "_"), args)
        measured[name] = measure(training[name]["final"], rows, args)
        before = "warm" if path == "warm" else "base"
        results["accuracy_change"][f"{name} - {before}"] = accuracy_change(measured[before], measured[name])
        print(f"{name}: trained in {training[name]['wall_s']:.0f} s, measured in {measured[name]['wall_s']:.0f} s",
              flush=True)
    results["total_wall_s"] = time.perf_counter() - started
    print(table(measured))
    for name, phase in training.items():
        print(f"{name}: {phase['steps']} steps in {phase['wall_s']:.0f} s ({phase['steps_per_s']:.4f} steps/s)")
    for name, (mean, low, high) in results["accuracy_change"].items():
        print(f"accuracy {name}: {mean:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap 95%)")
    print(f"total {results['total_wall_s']:.0f} s")
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    if scratch is not None:
        scratch.cleanup()
    return results


if __name__ == "__main__":
    main()
