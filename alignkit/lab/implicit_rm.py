"""DPO's implicit reward model evaluated like any reward model:
`alignkit eval-rm --policy P [--reference R] --data PAIRS [--shifted OTHER ...] [--model RM]`.

A DPO policy pi_theta trained from pi_ref defines (Rafailov et al. 2023, eq. 5)

    r(x, y) = beta * log pi_theta(y | x) / pi_ref(y | x)  (+ beta log Z(x), equal for both
    responses of a pair, so it cancels in every pairwise comparison and is left out)

with log pi(y | x) the summed log-probabilities of the response tokens given the prompt
(`alignkit.models.sequence_logps`, the same tokenisation as DPO training:
`tokenize_pairwise` + `collate_pairs`). "On the Limited Generalization Capability of the
Implicit Reward Model Induced by DPO" (Lin et al. 2024; papers.txt) calls this DPORM and
compares its accuracy at ranking the preferred answer of a pair above the rejected one with an
explicit RM (EXRM) trained on the same data, in distribution and under distribution shift;
they find DPORM fits its training distribution comparably but drops 3% on average (7% at most)
under shift. (Checked: the definition against the DPO paper, the evaluation against the
abstract in papers.txt; the paper's full text was not in the stored corpus.)

The report: for the in-distribution file (`--data`) and each `--shifted FILE` (repeatable; each
named by its file name), every metric `eval-rm` reports for an RM (`pairwise_metrics`: strict
accuracy with its bootstrap interval, ties and ties-counted-half accuracy, ECE, score
distributions), for the implicit RM and, with `--model RM`, for that explicit RM beside it;
printed as a table and written as JSON (`--output`).

`beta` defaults to the policy run's own `beta` (its config.yaml), else 0.1; `--set beta=B`
overrides. The reference defaults to the model the policy was trained from (`base_model_of`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.data import (
    collate_pairs,
    load_rows,
    split_implicit_prompt,
    tokenize_pairwise,
    validate_rows,
)
from alignkit.data.table import RowTable
from alignkit.eval.reward_eval import evaluate_reward_model, pairwise_metrics
from alignkit.lab.policy_loading import base_model_of, load_policy, run_config_of
from alignkit.models import sequence_logps

logger = logging.getLogger(__name__)
DEFAULT_BETA = 0.1


def implicit_pair_rewards(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    table: RowTable,
    *,
    beta: float,
    batch_size: int = 8,
    max_length: int = 512,
    max_prompt_length: int | None = 256,
    chat: bool = False,
) -> tuple[Tensor, Tensor]:
    """(chosen rewards (N,), rejected rewards (N,)) of the N pairs of `table`, in row order:
    beta * (log pi(y|x) - log ref(y|x)), summed over response tokens, float32 on the CPU."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    examples, stats = tokenize_pairwise(table, tokenizer, max_length=max_length,
                                        max_prompt_length=max_prompt_length, chat=chat)
    if stats.truncated_prompts or stats.truncated_responses:
        logger.info("%s: %s", table.source, stats.summary())
    device = next(policy.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate_pairs(chunk, tokenizer.pad_token_id)
        inputs = [batch[key].to(device) for key in ("input_ids", "attention_mask", "response_mask")]
        with torch.no_grad():
            policy_logps, _ = sequence_logps(policy, *inputs)  # (2B,): chosen rows, then rejected
            reference_logps, _ = sequence_logps(reference, *inputs)
        rewards = (beta * (policy_logps.float() - reference_logps.float())).cpu()
        chosen.append(rewards[:len(chunk)])
        rejected.append(rewards[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


def run_beta(policy: str) -> float | None:
    """The `beta` the policy's run was trained with (its config.yaml's hparams), or None."""
    beta = ((run_config_of(policy) or {}).get("hparams") or {}).get("beta")
    return float(beta) if isinstance(beta, int | float) else None


def parse_sets(values: list[str]) -> dict[str, float]:
    """`--set beta=0.1` (the only key): {"beta": 0.1}; anything else is an error naming it."""
    result = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or key.strip() != "beta":
            raise ValueError(f"--set {text}: eval-rm --policy takes --set beta=B only")
        try:
            result["beta"] = float(value)
        except ValueError:
            raise ValueError(f"--set {text}: beta must be a number") from None
    return result


def _pairs(source: str, flag: str) -> RowTable:
    table = load_rows(source)
    validate_rows(table, "pairwise", allow_identical_pairs=True)
    if not table.rows:
        raise ValueError(f"{flag} {source}: no pairs")
    return table


def format_table(report: dict[str, Any]) -> str:
    """One line per (data set, reward model): pairs, accuracy [95% CI], ties-half accuracy, ECE."""
    lines = [f"{'data':<24} {'reward model':<10} {'pairs':>6} {'accuracy [95% CI]':>24} "
             f"{'ties':>5} {'acc (ties 1/2)':>14} {'ECE':>6}"]
    for name, models in report["datasets"].items():
        for model_name, m in models.items():
            low, high = m["accuracy_ci"]
            lines.append(f"{name[:24]:<24} {model_name:<10} {m['n_pairs']:>6} "
                         f"{m['accuracy']:>9.3f} [{low:.3f}, {high:.3f}] {m['ties']:>5} "
                         f"{m['accuracy_ties_half']:>14.3f} {m['ece']:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """alignkit eval-rm --policy P [--reference R] --data PAIRS [--shifted FILE ...] [--model RM]"""
    from alignkit.lab.argtypes import (
        check_data_source,
        non_negative_int,
        positive_int,
        prepare_output_file,
    )

    parser = argparse.ArgumentParser(
        prog="alignkit eval-rm --policy",
        description="Evaluate DPO's implicit reward beta*(log pi(y|x) - log ref(y|x)) as a reward model "
        "on preference pairs (Lin et al. 2024), in distribution (--data) and on shifted pairs (--shifted, "
        "repeatable), beside an explicit reward model (--model) when given.",
    )
    parser.add_argument("--policy", required=True, help="the DPO-trained policy (a run's final/, a checkpoint)")
    parser.add_argument("--reference", default=None, help="the reference (default: the model the policy was "
                        "trained from, as its run records it)")
    parser.add_argument("--data", required=True, help="in-distribution pairs (prompt, chosen, rejected)")
    parser.add_argument("--shifted", action="append", default=[], help="shifted pairs; repeatable")
    parser.add_argument("--model", default=None, help="an explicit reward model to report beside it")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="beta=B (default: the run's)")
    parser.add_argument("--output", default=None, help="write the results JSON here")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-length", type=positive_int, default=512)
    parser.add_argument("--max-prompt-length", type=positive_int, default=256)
    parser.add_argument("--chat-template", action="store_true", help="render plain-text pairs with the chat "
                        "template (as training with --chat-template did)")
    parser.add_argument("--n-bootstrap", type=positive_int, default=2000)
    parser.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap draws")
    args = parser.parse_args(argv)
    for flag, source in [("--data", args.data)] + [("--shifted", s) for s in args.shifted]:
        check_data_source(flag, source)
    if args.output:
        prepare_output_file("--output", args.output)
    reference = args.reference or base_model_of(args.policy)
    if reference is None:
        raise ValueError(f"--policy {args.policy}: its run does not record the model it was trained from; "
                         "give --reference")
    beta = parse_sets(args.sets).get("beta", run_beta(args.policy) or DEFAULT_BETA)
    if not beta > 0:
        raise ValueError(f"--set beta={beta}: beta must be > 0")
    names = [Path(args.data).name] + [Path(s).name for s in args.shifted]
    if len(set(names)) != len(names):
        raise ValueError(f"--data/--shifted: two files share a name ({names}); rename one")
    tables = {name: _pairs(source, flag) for name, source, flag in
              zip(names, [args.data, *args.shifted], ["--data"] + ["--shifted"] * len(args.shifted), strict=True)}

    policy, tokenizer = load_policy(args.policy)
    reference_model, reference_tokenizer = load_policy(reference)
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--reference {reference}: its tokenizer differs from the policy's; the implicit reward "
                         "needs the model the policy was trained from")
    policy.eval()
    reference_model.eval()
    datasets: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        chosen, rejected = implicit_pair_rewards(
            policy, reference_model, tokenizer, table, beta=beta, batch_size=args.batch_size,
            max_length=args.max_length, max_prompt_length=args.max_prompt_length, chat=args.chat_template)
        datasets[name] = {"implicit": pairwise_metrics(chosen, rejected, n_bootstrap=args.n_bootstrap,
                                                       seed=args.seed)}
    if args.model is not None:
        from alignkit.rewards.saved import load_reward_model, reward_model_kind

        kwargs = {} if reward_model_kind(args.model) == "embedding_rm" else {"batch_size": args.batch_size}
        scorer = load_reward_model(args.model, **kwargs)
        for name, table in tables.items():
            pairs = [split_implicit_prompt(row) for row in table.rows]
            datasets[name]["explicit"] = evaluate_reward_model(scorer, pairs, n_bootstrap=args.n_bootstrap,
                                                               seed=args.seed)
    report = {"policy": str(args.policy), "reference": str(reference), "beta": beta,
              "explicit_model": args.model, "in_distribution": names[0], "shifted": names[1:],
              "datasets": datasets}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    if args.output:
        print(f"results: {args.output}")
    return 0
