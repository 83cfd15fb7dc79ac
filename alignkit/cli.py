"""The `alignkit` command: one verb per job.

  alignkit train ALGO --model M --data D --output DIR [--set key=value ...]
  alignkit train --config recipe.yaml [--set key=value ...]
  alignkit algorithms
  alignkit demo [--output DIR]
  alignkit merge --method METHOD [--base A] --models B [C ...] --output OUT
  alignkit surgery --model M --positive P --negative N --layers 1,2 --strength S --output OUT
  alignkit sweep --config recipe.yaml --space space.yaml --trials N [--tune-seeds 0,1] [--test-seeds 100,101]
  alignkit tax --models base,aligned[,...] [--reward SPEC] [--output DIR]
  alignkit safety --model M [--baseline B] [--judge DIR] [--output DIR]
  alignkit imagine --task task.yaml --model M --out dialogues.jsonl [--n 64] [--max-turns 6]
  alignkit label --prompts P --model M --reward SPEC [--n 4] --out pairs.jsonl
  alignkit serve-rm DIR [--port 8000] [--host 127.0.0.1] [--max-batch 32]
  alignkit modes --run DIR --classes modes.yaml [--prompts P] [--output DIR]
  alignkit faithfulness --models base,tuned --questions Q.jsonl [--output DIR]
  alignkit label-principles --prompts P --model M --principles FILE --out pairs.jsonl
  alignkit augment-pairs --data PAIRS --method convexda --out augmented.jsonl
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

VERBS = {
    "train": "train a registered algorithm (alignkit train ALGO --help)",
    "algorithms": "list every algorithm with its kind, data format, models and paper",
    "demo": "align SmolLM2-135M-Instruct towards positive movie reviews and report",
    "eval-rm": "evaluate a reward model: accuracy (bootstrap CI), ECE, scores, consistency",
    "eval": "sample a model: gold reward, KL, win rate, length, diversity -> eval.json",
    "overopt": "reward over-optimisation curves (Gao et al. 2022): best-of-n and RL checkpoints",
    "merge": "merge weights (interpolate, hma, soup, greedy_soup, task_arithmetic, lines) -> a checkpoint",
    "surgery": "model surgery: a behaviour probe, then edit the gate rows inversely aligned with it -> a checkpoint",
    "sweep": "hyper-parameter search (Optuna) over a recipe: tuning seeds, then disjoint test seeds",
    "tax": "alignment tax: held-out NLL on general text against reward, base vs aligned (Pareto front)",
    "safety": "refusal rate on harmful requests, over-refusal on look-alikes, changes against a baseline",
    "imagine": "a model writes multi-turn dialogues from a task file (personas, both roles, rewards) -> JSONL",
    "label": "preference pairs from a reward: n samples per prompt, best vs worst -> pairs.jsonl (for dpo)",
    "faithfulness": "chain-of-thought faithfulness (early answering, added mistakes), before vs after fine-tuning",
    "modes": "mode share over training (Echo Chamber): each checkpoint's outputs by format class -> modes.png",
    "serve-rm": "serve a reward model over HTTP (batched JSON; OpenRLHF's remote_rm_url too): --reward http://...",
    "label-principles": "SALMON pairs: a base model judges two samples under principles (both orders) -> pairs.jsonl",
    "augment-pairs": "ConvexDA: add pairs with perturbed chosen responses on a convex hull (for train rm)",
}


def _pop_option(argv: list[str], name: str, repeat: bool = False) -> list[str]:
    """Remove `--name value` / `--name=value` occurrences from argv; return the values."""
    values, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"{name} needs a value")
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    argv[:] = rest
    if not repeat and len(values) > 1:
        raise ValueError(f"{name} given more than once")
    return values


def resumed_config(saved: Path):
    """The config a run saved, as `--resume` starts from: without the flags that only told that
    launch how to start (--overwrite, --override)."""
    from alignkit.training.run.config import TrainConfig

    config = TrainConfig.from_yaml(saved)
    config.overwrite, config.override = False, ""
    return config


def cmd_train(argv: list[str]) -> int:
    from alignkit.algorithms import ALGORITHMS
    from alignkit.cli_train import explicit_fields, parse_train_flags, train_overview
    from alignkit.training.run.config import TrainConfig, parse_set_values
    from alignkit.training.run.validate import validate_config

    argv = list(argv)
    sets = _pop_option(argv, "--set", repeat=True)
    rewards = _pop_option(argv, "--reward", repeat=True)
    recipe = _pop_option(argv, "--config")
    algorithm = argv.pop(0) if argv and not argv[0].startswith("-") else None
    resume = _pop_option(argv, "--resume")
    wants_help = "--help" in argv or "-h" in argv
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; `alignkit algorithms` lists them")
    if wants_help and not (algorithm or recipe or resume):
        print(train_overview(ALGORITHMS))
        return 0
    saved = Path(resume[0]) / "config.yaml" if resume else None
    if recipe:
        default = TrainConfig.from_yaml(recipe[0])
    elif saved is not None and saved.exists():
        default = resumed_config(saved)  # continue with the interrupted run's config
    else:
        default = TrainConfig()
    if resume:
        default.resume = resume[0]
    if algorithm:
        default.algorithm = algorithm
    elif not (recipe or resume):
        raise ValueError("name an algorithm (`alignkit algorithms` lists them) or pass --config recipe.yaml")
    elif not recipe and not saved.exists():
        raise FileNotFoundError(f"--resume {resume[0]}: no config.yaml there, so it is not a run directory "
                                "alignkit wrote; name the algorithm (and its flags) to start a run in it")
    if default.algorithm not in ALGORITHMS:
        source = recipe[0] if recipe else saved
        raise ValueError(f"{source}: unknown algorithm {default.algorithm!r}; `alignkit algorithms` lists them")
    baseline = resumed_config(saved) if saved is not None and saved.exists() and not recipe else TrainConfig()
    description = (
        f"Train {default.algorithm}. Algorithm hyper-parameters: --set key=value "
        "(e.g. --set beta=0.1), repeatable; --config recipe.yaml loads a recipe first. "
        + hparams_help(default.algorithm, ALGORITHMS)
    )
    config = parse_train_flags(argv, default, description)
    if rewards:
        config.reward = rewards[0] if len(rewards) == 1 else rewards
    config.hparams = dict(default.hparams)
    for key, value in parse_set_values(sets).items():
        try:
            config.apply_overrides({key: value})
        except ValueError as error:
            raise ValueError(f"--set {key}: {error}") from None
    if config.data is None and not config.resume and ALGORITHMS[config.algorithm].kind != "diffusion":
        raise ValueError("--data is required (a JSONL/JSON/Parquet/CSV file, a directory of them or a hub dataset id)")
    validate_config(config, explicit_fields(config, baseline))

    if config.placement != "local":  # the workers run on Ray; this process drives them
        from alignkit.training.cluster.launch import run_placed as run
    elif ALGORITHMS[config.algorithm].runner == "online":
        from alignkit.training.online.loop import run_online as run
    else:
        from alignkit.training.offline.loop import run_offline as run

    result = run(config)
    from alignkit.training.run.distributed import current

    if current().is_main:  # under torchrun, rank 0 alone reports
        shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
        print(f"final model: {result.final_dir}")
        print(f"last metrics: {shown}")
    return 0


def hparams_help(name: str, algorithms) -> str:
    """One line naming the algorithm's `--set` hyper-parameters and their defaults."""
    import dataclasses

    from alignkit.training.run.config import TrainConfig

    if name not in algorithms:
        return ""
    spec = algorithms[name]
    try:
        task = spec.make_task(TrainConfig(algorithm=name))
    except ValueError as error:  # required hyper-parameters: the error says which
        return f"Required: {error}"
    if spec.runner == "online" and dataclasses.is_dataclass(task):
        values = dataclasses.asdict(task)
    else:
        values = dict(getattr(task, "hparams", None) or {})
    shown = ", ".join(f"{key}={value!r}" for key, value in values.items())
    text = f"{name} hyper-parameters (defaults): {shown or 'none'}."
    if spec.kind == "pairwise":
        from alignkit.training.offline.pairwise_options import PairwiseOptions

        options = ", ".join(f.name for f in dataclasses.fields(PairwiseOptions))
        text += f" Pairwise family options: {options}."
    return text


def cmd_algorithms(argv: list[str]) -> int:
    from alignkit.algorithms import algorithms_table
    from alignkit.cli_args import check_no_arguments_but

    if "-h" in argv or "--help" in argv:
        print("usage: alignkit algorithms [--markdown]\n\nEvery algorithm with its kind, data format, "
              "models and paper; --markdown prints the README's table.")
        return 0
    check_no_arguments_but(argv, ("--markdown",), "algorithms")
    print(algorithms_table(markdown="--markdown" in argv))
    return 0


def cmd_eval_rm(argv: list[str]) -> int:
    """alignkit eval-rm --model RM --data PAIRS ... (alignkit.cli_eval_rm)"""
    from alignkit.cli_eval_rm import main as eval_rm_main

    return eval_rm_main(argv)


def cmd_eval(argv: list[str]) -> int:
    """alignkit eval --model M [--ref R] --prompts P --reward SPEC [--judge SPEC] ..."""
    from alignkit.lab.eval_command import main as eval_main

    return eval_main(argv)


def cmd_overopt(argv: list[str]) -> int:
    """alignkit overopt --proxy SPEC --gold SPEC [--model M] [--checkpoints DIR ...] ..."""
    from alignkit.lab.overopt_lab import main as overopt_main

    return overopt_main(argv)


def cmd_merge(argv: list[str]) -> int:
    """alignkit merge --method METHOD [--base A] --models B [C ...] --output OUT ..."""
    from alignkit.merge.command import main as merge_main

    return merge_main(argv)


def cmd_surgery(argv: list[str]) -> int:
    """alignkit surgery --model M --positive P --negative N --layers 1,2 --strength S --output OUT"""
    from alignkit.merge.surgery_command import main as surgery_main

    return surgery_main(argv)


def cmd_sweep(argv: list[str]) -> int:
    """alignkit sweep --config recipe.yaml --space space.yaml --trials N ..."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ValueError("alignkit sweep needs optuna: pip install 'alignkit[tune]'") from None
    from alignkit.sweep.command import main as sweep_main

    return sweep_main(argv)


def cmd_tax(argv: list[str]) -> int:
    """alignkit tax --models base,aligned[,...] [--reward SPEC] [--prompts FILE] [--output DIR]"""
    from alignkit.lab.tax_lab import main as tax_main

    return tax_main(argv)


def cmd_safety(argv: list[str]) -> int:
    """alignkit safety --model M [--baseline B] [--judge DIR] [--output DIR]"""
    from alignkit.lab.safety_lab import main as safety_main

    return safety_main(argv)


def cmd_imagine(argv: list[str]) -> int:
    """alignkit imagine --task task.yaml --model M --out dialogues.jsonl [--n 64] [--max-turns 6] ..."""
    from alignkit.lab.imagine import main as imagine_main

    return imagine_main(argv)


def cmd_augment_pairs(argv: list[str]) -> int:
    """alignkit augment-pairs --data PAIRS --method convexda --out augmented.jsonl [--copies 5] [--per-pair 1]"""
    from alignkit.lab.convexda import main as augment_main

    return augment_main(argv)


def cmd_label(argv: list[str]) -> int:
    """alignkit label --prompts P --model M --reward SPEC [--n 4] --out pairs.jsonl"""
    from alignkit.lab.label import main as label_main

    return label_main(argv)


def cmd_modes(argv: list[str]) -> int:
    """alignkit modes --run DIR --classes modes.yaml [--prompts P] [--n 4] [--output DIR]"""
    from alignkit.lab.modes_lab import main as modes_main

    return modes_main(argv)


def cmd_faithfulness(argv: list[str]) -> int:
    """alignkit faithfulness --models base,tuned --questions Q.jsonl [--fractions 0,0.5,1] [--output DIR]"""
    from alignkit.lab.faithfulness_lab import main as faithfulness_main

    return faithfulness_main(argv)


def cmd_serve_rm(argv: list[str]) -> int:
    """alignkit serve-rm DIR|SPEC [--port P] [--host H] [--max-batch N] [--max-wait-ms MS]"""
    from alignkit.rewards.http_server import main as serve_main

    return serve_main(argv)


def cmd_label_principles(argv: list[str]) -> int:
    """alignkit label-principles --prompts P --model M --principles FILE --out pairs.jsonl"""
    from alignkit.lab.principle_label import main as principle_label_main

    return principle_label_main(argv)


def cmd_demo(argv: list[str]) -> int:
    from alignkit.demo import main as demo_main

    return demo_main(argv)


def main(argv: list[str] | None = None) -> int:
    """The `alignkit` command. Output cut short by a closed pipe (`alignkit ... | head`) ends
    quietly with exit code 141 (128 + SIGPIPE), as a shell tool killed by SIGPIPE would."""
    try:
        try:
            return run_verb(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that nothing more is written to the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in tests)
        pass
    finally:
        os.close(devnull)


def run_verb(argv: list[str] | None = None) -> int:
    """Run one verb; a user mistake (ValueError, FileNotFoundError) is one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nverbs:")
        width = max(len(verb) for verb in VERBS)
        for verb, text in VERBS.items():
            print(f"  {verb:<{width}} {text}")
        return 0
    verb, rest = argv[0], argv[1:]
    commands = {"train": cmd_train, "algorithms": cmd_algorithms, "demo": cmd_demo, "eval-rm": cmd_eval_rm,
                "eval": cmd_eval, "overopt": cmd_overopt, "merge": cmd_merge, "surgery": cmd_surgery,
                "sweep": cmd_sweep, "tax": cmd_tax, "safety": cmd_safety, "imagine": cmd_imagine,
                "label": cmd_label, "modes": cmd_modes, "faithfulness": cmd_faithfulness,
                "serve-rm": cmd_serve_rm, "label-principles": cmd_label_principles,
                "augment-pairs": cmd_augment_pairs}
    if verb not in commands:
        print(f"alignkit: unknown verb {verb!r}; one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    # under torchrun every rank may print an error: say which one
    where = f" [rank {os.environ['RANK']}]" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""
    try:
        if verb in ("eval", "eval-rm", "overopt", "merge", "surgery", "tax", "safety", "imagine",
                    "label", "modes", "faithfulness", "serve-rm",
                    "label-principles"):  # --threads for these
            from alignkit.training.run.threads import configure_cli_threads

            rest = configure_cli_threads(rest)
        return commands[verb](rest)
    except (ValueError, FileNotFoundError) as error:  # bad input: the message names the problem
        if os.environ.get("ALIGNKIT_DEBUG"):
            raise
        print(f"alignkit {verb}{where}: error: {' '.join(str(error).split())}", file=sys.stderr)
        print("(set ALIGNKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a failure that names itself in one line (a Ray worker died)
        if os.environ.get("ALIGNKIT_DEBUG") or not getattr(error, "one_line", False):
            raise
        print(f"alignkit {verb}{where}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # Ctrl-C / SIGTERM; a RunInterrupted says how to resume
        print(f"alignkit {verb}{where}: {getattr(stop, 'message', 'interrupted')}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Close the torchrun process group, if this process joined one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
