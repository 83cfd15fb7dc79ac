"""`alignkit merge`: weights in, a `from_pretrained` checkpoint out.

    alignkit merge --method interpolate --base SFT --models RLHF --alpha 0.3 --output OUT
    alignkit merge --method interpolate --base SFT --models RLHF --sweep 0:1:0.1 --output OUT
    alignkit merge --method hma --base SFT --models RLHF --ratios 0.2,0.3,0.4 --output OUT
    alignkit merge --method hma --base SFT --models RLHF --alpha 0.3 --data raft.jsonl --output OUT
    alignkit merge --method soup --models A B C --output OUT
    alignkit merge --method greedy_soup --models A B C --eval-data heldout.jsonl [--reward SPEC] --output OUT
    alignkit merge --method greedy_soup --models A B C --eval-data prompts.jsonl --score eval:kl --ref SFT --output OUT
    alignkit merge --method task_arithmetic --base PRE --models A B --lambdas 0.4,0.6 --output OUT
    alignkit merge --method lines --base PRE --models FT --alpha 0.2 --output OUT   (β = 1 − α)
    alignkit merge --method lines --base PRE --models A B --beta 0.5 --output OUT   (multi-task)

OUT holds safetensors weights, config, tokenizer and merge.json (the recipe, the inputs and,
for greedy_soup and learned HMA, every decision and the learned ratios); a sweep writes
OUT/alpha_0.30/ etc. and OUT/manifest.json listing them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from alignkit.lab.argtypes import DATA_SUFFIXES, non_negative_int, positive_int
from alignkit.merge.hma_opt import REFERENCE_EPSILON, REFERENCE_REG
from alignkit.merge.spec import METHODS, MergeRecipe, merge_state, validate_recipe

log = logging.getLogger("alignkit")

SWEEPABLE = ("interpolate", "lines")
HMA_LEARNING = ("steps", "lr", "epsilon", "reg")
DEFAULTS = {"steps": 20, "lr": 0.05, "epsilon": REFERENCE_EPSILON, "reg": REFERENCE_REG, "batch_size": 8, "max_length": 512,
            "max_new_tokens": 32}


def _numbers(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {'integers' if kind is int else 'numbers'}, "
                                             f"got {text!r}") from None
    return parse




def check_data_file(flag: str, source: str) -> None:
    """A data source named like a path must exist (anything else may be a hub dataset id)."""
    from alignkit.models.sources import looks_like_path

    if not Path(source).exists() and (looks_like_path(source) or source.endswith(DATA_SUFFIXES)):
        raise FileNotFoundError(f"{flag} {source}: no such file or directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit merge", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge model weights into one from_pretrained checkpoint (safetensors + tokenizer + config). "
        "Inputs are model directories, hub ids, smollm2-135m or LoRA adapter directories (merged onto their base "
        "first); architectures, parameter names and shapes, and tokenizers must match.",
        epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--base", default=None, help="the base model: A of interpolate/hma (weight alpha), "
                        "the pre-trained model of task_arithmetic/lines")
    parser.add_argument("--models", nargs="+", action="extend", required=True,
                        help="the other models (space- or comma-separated, repeatable)")
    parser.add_argument("--output", required=True, help="directory to write (a sweep writes one per alpha in it)")
    parser.add_argument("--alpha", type=float, default=None, help="interpolate: weight of --base; lines "
                        "single-task: the first block's scale; hma: the mean ratio ᾱ")
    parser.add_argument("--sweep", default=None, metavar="START:STOP:STEP",
                        help="interpolate / single-task lines: one checkpoint per alpha, STOP included")
    parser.add_argument("--beta", type=float, default=None, help="lines: scale added by the last block "
                        "(single-task default 1 − alpha; multi-task required)")
    parser.add_argument("--lambdas", type=_numbers(float), default=None, help="task_arithmetic: one, or one per model")
    parser.add_argument("--ratios", type=_numbers(float), default=None, help="hma: one ratio per block")
    parser.add_argument("--pivots", type=_numbers(int), default=None, help="hma: last layer of each block but the "
                        "last (10,20: layers 0-10, 11-20, 21-end); default: --blocks equal blocks")
    parser.add_argument("--blocks", type=positive_int, default=None, help="hma: number of equal blocks (default: "
                        "one per ratio, 3 when learned)")
    learn = parser.add_argument_group("hma: learning the ratios (a few SFT steps through the merged weights)")
    learn.add_argument("--data", default=None, help="reward-filtered prompt/completion (or messages) rows")
    learn.add_argument("--steps", type=positive_int, default=None, help=f"Adam steps (default {DEFAULTS['steps']})")
    learn.add_argument("--lr", type=float, default=None, help=f"learning rate of the block scores (default {DEFAULTS['lr']})")
    learn.add_argument("--epsilon", type=float, default=None, help="added to each sigmoid before normalising "
                       f"(default {REFERENCE_EPSILON:g}, the reference's run script; 0 is the paper's formula)")
    learn.add_argument("--reg", type=float, default=None, help="L1 penalty on |alpha_k - mean|, once per linear "
                       f"layer of the block (default {REFERENCE_REG:g}, the reference's run script)")
    soup = parser.add_argument_group("greedy_soup: the held-out score")
    soup.add_argument("--eval-data", default=None, help="held-out rows: prompts (with --reward) or prompt/completion "
                      "rows (score = minus the NLL per completion token)")
    soup.add_argument("--reward", default=None, help="reward spec or reward-model directory scoring greedy "
                      "completions of the --eval-data prompts")
    soup.add_argument("--score", default=None, metavar="nll|reward|eval:METRIC[:max|min]",
                      help="nll: minus the NLL per completion token (the default without --reward); reward: mean "
                      "--reward of greedy completions (the default with it); eval:METRIC: a number of `alignkit "
                      "eval` (its eval.json path, e.g. eval:gold_reward, eval:kl, eval:win_rate, "
                      "eval:diversity/per_input/distinct_2), sampled as alignkit eval samples; :max / :min says "
                      "which way is better where the metric does not")
    soup.add_argument("--ref", default=None, help="eval: scores: the reference model of KL, win rate and reward "
                      "difference (as alignkit eval --ref)")
    soup.add_argument("--samples", type=positive_int, default=None, help="eval: scores: samples per prompt "
                      "(default: alignkit eval's, 4)")
    soup.add_argument("--temperature", type=float, default=None, help="eval: scores: sampling temperature "
                      "(default: alignkit eval's, 1.0)")
    soup.add_argument("--max-new-tokens", type=positive_int, default=None,
                      help=f"completion length with --reward (default {DEFAULTS['max_new_tokens']}) or an eval: "
                      "score (default: alignkit eval's, 48)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="rows per forward (default 8)")
    parser.add_argument("--max-length", type=positive_int, default=None, help="prompt+completion tokens (default 512)")
    parser.add_argument("--chat-template", action="store_true", help="wrap plain-text rows in the chat template")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype written (auto: the base checkpoint's); merging is done in float32")
    parser.add_argument("--device", default=None, help="where greedy_soup scores and hma learns (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output a previous merge wrote")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_sweep(text: str) -> list[float]:
    """`START:STOP:STEP` -> [START, START+STEP, ..., STOP] (STOP included; (STOP−START)/STEP must
    be a whole number)."""
    try:
        start, stop, step = (float(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--sweep {text}: expected START:STOP:STEP, e.g. 0:1:0.1") from None
    if step <= 0 or stop < start:
        raise ValueError(f"--sweep {text}: needs STEP > 0 and STOP >= START")
    count = (stop - start) / step
    if abs(count - round(count)) > 1e-6:
        raise ValueError(f"--sweep {text}: (STOP - START) / STEP = {count:g} is not a whole number of steps")
    return [round(start + i * step, 10) for i in range(round(count) + 1)]


def sweep_names(values: list[float]) -> list[str]:
    """alpha_0.30 style names with as many decimals as keep them distinct (at least 2)."""
    for decimals in range(2, 11):
        names = [f"alpha_{v:.{decimals}f}" for v in values]
        if len(set(names)) == len(names):
            return names
    raise ValueError("--sweep: values too close to name apart")


def check_arguments(args: argparse.Namespace) -> tuple[MergeRecipe, list[float] | None]:
    """Every check that needs no model: flags the method ignores, files, model sources, --output."""
    from alignkit.merge.io import check_source

    models = [m for item in args.models for m in item.split(",") if m]
    recipe = MergeRecipe(args.method, models, args.base, args.alpha, args.beta, args.lambdas, args.ratios,
                         args.pivots, args.blocks)
    sweep = None
    if args.sweep is not None:
        if args.method not in SWEEPABLE or (args.method == "lines" and len(models) > 1):
            raise ValueError(f"--sweep sweeps alpha of interpolate or single-task lines, not {args.method}"
                             f"{' (multi-task)' if args.method == 'lines' else ''}")
        if args.alpha is not None:
            raise ValueError("give --alpha or --sweep, not both")
        if args.beta is not None:
            raise ValueError("--sweep sets beta = 1 - alpha at each point; --beta cannot be swept with it")
        sweep = parse_sweep(args.sweep)
    learned = args.method == "hma" and args.data is not None
    _refuse_unused(args, learned)
    validate_recipe(recipe, data_driven=learned or sweep is not None or args.method == "greedy_soup")
    if args.method == "greedy_soup" and args.eval_data is None:
        raise ValueError("greedy_soup needs --eval-data (held-out prompts with --reward, or prompt/completion rows)")
    if args.method == "greedy_soup":
        check_score(args)
    for flag, source in (("--data", args.data), ("--eval-data", args.eval_data)):
        if source is not None:
            check_data_file(flag, source)
    for index, (source, _) in enumerate(recipe.sources()):
        check_source(source, "--base" if index == 0 and recipe.base is not None else "--models")
    inputs = {Path(source).expanduser().resolve() for source, _ in recipe.sources()}
    if Path(args.output).expanduser().resolve() in inputs:
        raise ValueError(f"--output {args.output}: is one of the input models; write the merge elsewhere")
    _check_output(Path(args.output), args.overwrite)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return recipe, sweep


def _refuse_unused(args: argparse.Namespace, learned: bool) -> None:
    """A flag the method does not read is an error, not a silent no-op."""
    if args.data is not None and args.method != "hma":
        raise ValueError(f"--data is what hma learns its ratios on; {args.method} does not use it")
    for key in HMA_LEARNING:
        if getattr(args, key) is not None and not learned:
            raise ValueError(f"--{key} is a setting of learning hma ratios (--method hma --data FILE)")
    for key in ("eval_data", "reward", "max_new_tokens", "score", "ref", "samples", "temperature"):
        if getattr(args, key) is not None and args.method != "greedy_soup":
            raise ValueError(f"--{key.replace('_', '-')} scores greedy_soup's candidates; {args.method} does not use it")
    evaluated = args.score is not None and args.score.startswith("eval:")
    if args.max_new_tokens is not None and args.reward is None and not evaluated:
        raise ValueError("--max-new-tokens sets the length of the completions --reward or an eval: --score scores; "
                         "add one")
    for key in ("ref", "samples", "temperature"):
        if getattr(args, key) is not None and not evaluated:
            raise ValueError(f"--{key} is a setting of an eval: --score (e.g. --score eval:kl)")
    scored = learned or args.method == "greedy_soup"
    for key in ("batch_size", "max_length"):
        if getattr(args, key) is not None and not scored:
            raise ValueError(f"--{key.replace('_', '-')} applies to the data of hma --data or greedy_soup")
    if (args.chat_template or args.device is not None) and not scored:
        flag = "--chat-template" if args.chat_template else "--device"
        raise ValueError(f"{flag} applies to the data of hma --data or greedy_soup")


def check_score(args: argparse.Namespace) -> None:
    """greedy_soup's --score: resolve its default, refuse a --reward it ignores or a metric it cannot
    compute, and fill in an eval: score's settings from `alignkit eval`'s defaults; sets
    args.metric / args.direction (None unless eval:)."""
    from alignkit.lab.eval_command import EvalOptions
    from alignkit.lab.eval_metrics import NEEDS_REFERENCE, parse_eval_metric
    from alignkit.merge.io import check_source

    args.score = args.score or ("reward" if args.reward is not None else "nll")
    args.metric = args.direction = None
    if args.score == "nll" and args.reward is not None:
        raise ValueError("--score nll reads the --eval-data completions and no reward; drop --reward or use "
                         "--score reward")
    if args.score == "reward" and args.reward is None:
        raise ValueError("--score reward needs --reward SPEC")
    if args.score in ("nll", "reward"):
        return
    if not args.score.startswith("eval:"):
        raise ValueError(f"--score {args.score}: expected nll, reward or eval:METRIC[:max|min]")
    args.metric, args.direction = parse_eval_metric(args.score[len("eval:"):])
    if args.metric in NEEDS_REFERENCE and args.ref is None:
        raise ValueError(f"--score {args.score}: {args.metric} compares with a reference model; add --ref MODEL")
    if args.metric not in NEEDS_REFERENCE and args.ref is not None:
        raise ValueError(f"--ref: eval:{args.metric} does not read a reference (kl, win_rate, lc_win_rate and "
                         "reward_diff_vs_reference do)")
    if args.ref is not None:
        check_source(args.ref, "--ref")
    defaults = EvalOptions(model="")
    for key in ("reward", "samples", "temperature", "max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(defaults, key))


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_file():
        raise ValueError(f"--output {path}: is a file; name a directory")
    if path.is_dir() and any(path.iterdir()):
        ours = (path / "merge.json").is_file() or (path / "manifest.json").is_file()
        if not overwrite:
            raise ValueError(f"--output {path}: exists and is not empty; pass --overwrite to replace a merge there")
        if not ours:
            raise ValueError(f"--output {path}: holds no merge.json or manifest.json, so it is not a merge "
                             "alignkit wrote; --overwrite only replaces those")


def stored_dtype(source: str) -> torch.dtype:
    """The dtype a checkpoint's config.json records (a LoRA adapter: its base's), float32 if none."""
    from alignkit.merge.io import is_adapter_dir
    from alignkit.models.loading import resolve_model_path

    path = Path(source).expanduser()
    if is_adapter_dir(source):
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return stored_dtype(base)
    try:
        config = json.loads((Path(resolve_model_path(source)) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def run_merge(args: argparse.Namespace) -> dict[str, Any]:
    from alignkit.merge.io import load_inputs, save_merged

    recipe, sweep = check_arguments(args)
    progress = not args.no_progress and sys.stderr.isatty()
    out_dtype = stored_dtype(recipe.sources()[0][0]) if args.dtype == "auto" else getattr(torch, args.dtype)
    inputs = load_inputs(recipe.sources(), progress=progress)
    base_record = {"inputs": [{"label": one.label, "source": one.source, "lora": one.lora} for one in inputs],
                   "dtype": str(out_dtype).removeprefix("torch.")}
    output = Path(args.output)
    if output.is_dir() and args.overwrite:
        shutil.rmtree(output)
    if sweep is not None:
        return _run_sweep(recipe, sweep, inputs, output, base_record, out_dtype, progress)
    if args.method == "greedy_soup":
        state, record = _greedy_soup(args, inputs, progress)
    elif args.method == "hma" and args.data is not None:
        state, record = _learned_hma(args, recipe, inputs, progress)
    else:
        state, record = merge_state(recipe, inputs)
    record = {**record, **base_record}
    save_merged(inputs[0], state, output, record, out_dtype)
    print(f"merged model: {output}")
    return record


def _run_sweep(recipe: MergeRecipe, values: list[float], inputs: list, output: Path, base_record: dict,
               dtype: torch.dtype, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from alignkit.merge.io import save_merged

    entries = []
    for value, name in tqdm(list(zip(values, sweep_names(values), strict=True)), desc="sweep", unit="checkpoint",
                            disable=not progress, leave=False):
        recipe.alpha = value
        state, record = merge_state(recipe, inputs)
        save_merged(inputs[0], state, output / name, {**record, **base_record}, dtype)
        entries.append({"alpha": value, "path": name, **({"beta": record["beta"]} if "beta" in record else {})})
    manifest = {"method": recipe.method, "sweep": "alpha", "checkpoints": entries, **base_record}
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for entry in entries:
        print(f"alpha {entry['alpha']:g}: {output / entry['path']}")
    print(f"manifest: {output / 'manifest.json'}")
    return manifest


def _device(args: argparse.Namespace) -> str:
    from alignkit.models.loading import default_device

    return args.device or default_device()


def _greedy_soup(args: argparse.Namespace, inputs: list, progress: bool) -> tuple[dict, dict[str, Any]]:
    from tqdm.auto import tqdm

    from alignkit.merge.methods import greedy_soup
    from alignkit.merge.scoring import completion_batches, nll_scorer, reward_scorer

    template = inputs[0]
    template.model.to(_device(args))
    if args.metric is not None:
        score, scored_by = _eval_score(args, template)
    elif args.reward is not None:
        from alignkit.lab.overopt_lab import load_prompt_list, load_scorer

        score = reward_scorer(template, load_prompt_list(args.eval_data), load_scorer(args.reward),
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        scored_by = {"score": "mean reward of greedy completions", "reward": args.reward,
                     "max_new_tokens": args.max_new_tokens}
    else:
        batches = completion_batches(args.eval_data, template.tokenizer, flag="--eval-data",
                                     max_length=args.max_length, batch_size=args.batch_size, chat=args.chat_template)
        score = nll_scorer(template, batches)
        scored_by = {"score": "mean log-prob per completion token (minus the NLL)"}
    with tqdm(total=2 * len(inputs) - 1, desc="greedy soup", unit="score", disable=not progress, leave=False) as bar:
        state, decisions, own = greedy_soup([one.state for one in inputs], [one.source for one in inputs], score,
                                            progress=lambda: bar.update(1))
    log.info("greedy soup: starts with %s (score %.6g)", decisions[0].name, decisions[0].soup_score)
    if args.direction == "min":
        print(f"scores are minus {args.metric} (lower {args.metric} is better)")
    for decision in decisions:
        verdict = "kept" if decision.accepted else "rejected"
        print(f"{decision.name}: own score {decision.ingredient_score:.6g}, soup with it "
              f"{decision.candidate_score:.6g} -> {verdict}")
    record = {"method": "greedy_soup", "eval_data": args.eval_data, **scored_by,
              "decisions": [d.as_dict() for d in decisions],
              "ingredients": [d.name for d in decisions if d.accepted], "soup_score": decisions[-1].soup_score}
    template.model.to("cpu")
    return state, record


def _eval_score(args: argparse.Namespace, template: Any) -> tuple[Any, dict[str, Any]]:
    """The eval: scorer of greedy_soup (`scoring.eval_scorer`) and what merge.json records of it."""
    from alignkit.lab.overopt_lab import load_prompt_list, load_scorer
    from alignkit.lab.policy_loading import load_policy
    from alignkit.merge.scoring import eval_scorer

    reference = None
    if args.ref is not None:
        reference = load_policy(args.ref, device=str(next(template.model.parameters()).device))[0].eval()
    score = eval_scorer(template, load_prompt_list(args.eval_data), args.metric, args.direction,
                        load_scorer(args.reward), reference=reference, samples=args.samples,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    sign = "" if args.direction == "max" else "minus "
    scored_by = {"score": f"{sign}alignkit eval's {args.metric} on the --eval-data prompts", "metric": args.metric,
                 "direction": args.direction, "reward": args.reward, "ref": args.ref, "samples": args.samples,
                 "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    return score, scored_by


def _learned_hma(args: argparse.Namespace, recipe: MergeRecipe, inputs: list, progress: bool) -> tuple[dict, dict]:
    from tqdm.auto import tqdm

    from alignkit.merge.hma_opt import linear_counts, optimise_hma
    from alignkit.merge.io import layer_index_map
    from alignkit.merge.methods import hma_merge
    from alignkit.merge.scoring import completion_batches
    from alignkit.merge.spec import hma_layout

    template = inputs[0]
    groups, blocks = hma_layout(recipe, template)
    num_blocks = max(blocks) + 1
    counts = linear_counts(template.state, groups, layer_index_map(template.model, list(groups))[0], num_blocks)
    batches = completion_batches(args.data, template.tokenizer, flag="--data", max_length=args.max_length,
                                 batch_size=args.batch_size, chat=args.chat_template)
    template.model.to(_device(args))
    torch.manual_seed(args.seed)
    with tqdm(total=args.steps, desc="hma ratios", unit="step", disable=not progress, leave=False) as bar:
        result = optimise_hma(template.model, template.state, inputs[1].state, groups, num_blocks, recipe.alpha,
                              batches, steps=args.steps, lr=args.lr, epsilon=args.epsilon, reg=args.reg,
                              penalty_weights=counts, seed=args.seed, on_step=lambda row: bar.update(1))
    template.model.to("cpu")
    print("learned ratios: " + ", ".join(f"block {k}: {r:.4f}" for k, r in enumerate(result.ratios))
          + f" (mean {sum(result.ratios) / len(result.ratios):.4f})")
    record = {"method": "hma", "learned": True, "data": args.data, "mean_ratio": recipe.alpha, "ratios": result.ratios,
              "block_scores": result.scores, "layer_blocks": blocks, "steps": args.steps, "lr": args.lr,
              "epsilon": args.epsilon, "reg": args.reg, "reg_linear_counts": counts, "history": result.history}
    return hma_merge(template.state, inputs[1].state, groups, result.ratios, recipe.alpha), record


def main(argv: list[str]) -> int:
    """The verb (`--threads` is taken out and applied by alignkit.cli first)."""
    run_merge(build_parser().parse_args(list(argv)))
    return 0
