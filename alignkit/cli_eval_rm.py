"""`alignkit eval-rm`: a reward model (or DPO's implicit one) on preference pairs, samples with a
true score (--r2) or contrast instructions (--consistency), as a results JSON."""

from __future__ import annotations

from pathlib import Path


def main(argv: list[str]) -> int:
    """alignkit eval-rm --model RM --data PAIRS [--consistency FILE] [--output results.json]
    alignkit eval-rm --model RM --data SAMPLES --r2 [--score-column score] [--output results.json]
    alignkit eval-rm --policy P [--reference R] --data PAIRS [--shifted FILE ...] [--model RM] [--set beta=B]"""
    import argparse
    import json

    if any(arg == "--policy" or arg.startswith("--policy=") for arg in argv):  # DPO's implicit reward model
        from alignkit.lab.implicit_rm import main as implicit_main

        return implicit_main(argv)

    from alignkit.cli_args import (
        check_data_source,
        check_reward_model_source,
        non_negative_int,
        positive_int,
        prepare_output_file,
    )
    from alignkit.lab.fusion_eval import (
        add_fusion_arguments,
        check_fusion_arguments,
        fusion_section,
    )

    parser = argparse.ArgumentParser(
        prog="alignkit eval-rm",
        description="Evaluate a reward model (plain, ensemble, BRME, ArmoRM or embedding RM "
        "directory) on preference pairs: accuracy with a bootstrap interval, ECE, score "
        "distributions, and reward consistency when I1/I2/R1/R2 columns are present. With --r2, "
        "--data holds samples with a true score instead (prompt, completion, score): the R² of a "
        "linear fit of the true score on the reward under each PF-PPO filter (all, best_of_n, "
        "best_random, best_worst; Zhang et al. 2024). With --policy P [--reference R], DPO's implicit reward "
        "beta*log(pi/ref) is evaluated instead (alignkit eval-rm --policy P --help).",
    )
    parser.add_argument("--model", required=True, help="reward-model directory or hub id")
    parser.add_argument("--data", default=None, help="pairs (prompt, chosen, rejected) file")
    parser.add_argument("--consistency", default=None, help="contrast-instruction file (I1, I2, R1, R2)")
    parser.add_argument("--output", default=None, help="write the results JSON here")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--n-bootstrap", type=positive_int, default=2000)
    parser.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap and best_random draws")
    parser.add_argument("--r2", action="store_true", help="--data holds samples (prompt, completion or "
                        "messages, a true score): report the R² of each PF-PPO filter")
    parser.add_argument("--score-column", default=None, help="with --r2: the true-score column (default score)")
    parser.add_argument("--principles", default=None, help="an rm_principles model: score under these principles "
                        "(text or JSON file)")
    parser.add_argument("--user-context", default=None, help="an rm_vpl model: the user's labelled pairs (JSONL)")
    add_fusion_arguments(parser)  # --fusion-index, --fusion-k, --fusion-min-sim: RewardFusion beside plain scores
    args = parser.parse_args(argv)
    check_fusion_arguments(parser, args)
    if args.data is None and args.consistency is None:
        parser.error("give --data and/or --consistency")
    if args.r2 and (args.data is None or args.consistency is not None):
        parser.error("--r2 evaluates the samples of --data alone; run --consistency without --r2")
    if args.score_column is not None and not args.r2:
        parser.error("--score-column names the true score of --r2 samples; add --r2")
    for flag, source in (("--data", args.data), ("--consistency", args.consistency),
                         ("--fusion-index", args.fusion_index)):
        if source is not None:
            check_data_source(flag, source)
    if args.output:
        prepare_output_file("--output", args.output)
    check_reward_model_source(args.model)

    from alignkit.data import load_rows, split_implicit_prompt
    from alignkit.eval.reward_eval import evaluate_reward_model
    from alignkit.rewards.saved import load_reward_model, reward_model_kind

    kwargs = {} if reward_model_kind(args.model) == "embedding_rm" else {"batch_size": args.batch_size}
    for flag, key, kind, trainer in (("--principles", "principles", "principles_rm", "rm_principles"),
                                     ("--user-context", "user_context", "vpl_rm", "rm_vpl")):
        if getattr(args, key) is not None:
            if reward_model_kind(args.model) != kind:
                parser.error(f"{flag} is for an {trainer} model; {args.model} is {reward_model_kind(args.model)}")
            kwargs[key] = getattr(args, key)
    if args.r2:
        return eval_rm_r2(args, lambda: load_reward_model(args.model, **kwargs))
    scorer = load_reward_model(args.model, **kwargs)
    pairs = []
    if args.data is not None:
        pairs = [
            split_implicit_prompt(row) if "chosen" in row else dict(row)
            for row in load_rows(args.data).rows
        ]
    consistency = load_rows(args.consistency).rows if args.consistency else None
    results = evaluate_reward_model(
        scorer, pairs, consistency=consistency, n_bootstrap=args.n_bootstrap, seed=args.seed
    )
    if args.fusion_index is not None:
        results["fusion"] = fusion_section(args, scorer, results, pairs, consistency)
    results = {"model": str(args.model), "kind": reward_model_kind(args.model), **results}
    text = json.dumps(results, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def eval_rm_r2(args, load_scorer) -> int:
    """eval-rm --r2: check the samples, then load the reward model, score them and report the R²
    of each PF-PPO filter as a table (and in --output's JSON, NaN written as null)."""
    import json

    from alignkit.data import load_rows
    from alignkit.eval.report import json_safe
    from alignkit.lab.rm_filters import evaluate_filters, format_filter_r2, scored_samples
    from alignkit.rewards.saved import reward_model_kind

    table = load_rows(args.data)
    score_column = args.score_column or "score"
    scored_samples(table, score_column)  # bad rows fail here, before the model loads
    r2 = evaluate_filters(load_scorer(), table, score_column=score_column, seed=args.seed)
    results = {"model": str(args.model), "kind": reward_model_kind(args.model), "r2": r2}
    if args.output:
        Path(args.output).write_text(json.dumps(json_safe(results), indent=2) + "\n")
    print(format_filter_r2(r2))
    if args.output:
        print(f"results: {args.output}")
    return 0
