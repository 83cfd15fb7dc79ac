"""`alignkit label`: preference pairs from a reward, for DPO and its family.

    alignkit label --prompts P.jsonl --model M --reward SPEC --n 4 --out pairs.jsonl

1. sample `n` responses per prompt from the model with the rollout engine (`HFEngine`,
   counter-based noise: the same seed gives the same samples);
2. score every response with the reward (any `--reward` spec: built-ins, `rm:DIR`, Python
   functions, `rlhs:CONFIG.yaml` for RLHS's hindsight-simulation labels), called as the online
   loop calls it (TRL's conventions; the prompt rows' other columns are passed by name);
3. per prompt, chosen = the best-scored response, rejected = the worst (the first of equals);
   a prompt is skipped, and counted by reason, when its best and worst scores are within
   `--tie-tolerance` (`ties`), when fewer than two of its responses are non-blank
   (`too_few_samples`; blank responses are counted too), or when the best and worst texts are
   the same (`identical_texts`, possible only with a reward that is not a function of the text);
   With `--lexicographic SPEC1:TOL1,SPEC2:TOL2` (or a YAML file) instead of `--reward`, the
   responses are compared on ordered reward factors with tolerances (HERON; see
   `alignkit.lab.lexicographic`): every decided comparison is a pair (`--pairing all`) or one
   per prompt (`best_worst`); each row also carries `factor_scores_chosen`,
   `factor_scores_rejected` and `decided_by` (the spec of the factor that decided it);
4. write the pairs in alignkit's pairwise format (`prompt`, `chosen`, `rejected`, plus
   `score_chosen` and `score_rejected`; a conversational prompt gets assistant-message
   responses, as TRL's conversational preference format), and `OUT_STEM.manifest.json`
   beside them: the settings, every count, the score means and what the reward logged
   (`rlhs/hindsight`, `rlhs/foresight`). The manifest is not named `manifest.json` so that
   a directory of pairs stays loadable as data (`--data DIR` reads every .json in it).

`alignkit train dpo --data pairs.jsonl` trains on the output as it is.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit.data import is_conversational, load_rows
from alignkit.lab.generation_eval import encode_prompts, progress_bar, prompt_text, sample
from alignkit.lab.lexicographic import lexicographic_label, parse_factors
from alignkit.lab.overopt_lab import load_scorer
from alignkit.lab.policy_loading import load_policy
from alignkit.rewards.runner import RewardRunner, reward_columns

log = logging.getLogger("alignkit")

SKIP_REASONS = ("ties", "too_few_samples", "identical_texts")


@dataclass
class LabelOptions:
    """`alignkit label` options."""

    prompts: str
    """Prompt-only dataset (`prompt` column, text or conversational); its other columns go to the reward."""
    model: str
    """The model sampled: a model directory, LoRA adapter, training checkpoint, hub id or smollm2-135m."""
    out: str
    """The pairs file (JSONL); its manifest is written beside it as OUT_STEM.manifest.json."""
    reward: str | None = None
    """The reward labelling the pairs: a reward spec (`vader`, `file.py:function`, `rm:DIR`,
    `rlhs:CONFIG.yaml`) or a reward-model directory."""
    lexicographic: str | None = None
    """Instead of --reward, HERON's ordered reward factors with tolerances: `SPEC1:TOL1,SPEC2:TOL2`
    (`TOLstd`: x the factor's std) or a YAML file (alignkit.lab.lexicographic)."""
    pairing: Literal["all", "best_worst"] | None = None
    """With --lexicographic: every decided pair per prompt (all, HERON's; the default) or one
    (best_worst: best vs worst Copeland score)."""
    n: int = 4
    """Responses sampled per prompt (>= 2): chosen is the best, rejected the worst."""
    num_prompts: int | None = None
    """Use only the first N prompts."""
    max_new_tokens: int = 48
    """Length limit of every response."""
    temperature: float = 1.0
    """Sampling temperature (> 0: n greedy responses would all be the same)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    seed: int = 0
    """Sampling seed."""
    tie_tolerance: float = 0.0
    """A prompt whose best and worst scores differ by at most this is a tie: skipped and counted."""
    batch_size: int = 64
    """Most responses decoded at once."""
    no_progress: bool = False
    """Hide the progress bars."""


def check_options(options: LabelOptions) -> None:
    """One-line errors naming the flag, before any model loads."""
    if (options.reward is None) == (options.lexicographic is None):
        raise ValueError("give --reward SPEC or --lexicographic FACTORS (one of them)")
    if options.pairing is not None and options.lexicographic is None:
        raise ValueError("--pairing chooses among --lexicographic comparisons; --reward pairs best with worst")
    if options.lexicographic is not None and options.tie_tolerance:
        raise ValueError("--tie-tolerance applies to --reward; give --lexicographic factors their own tolerances")
    if options.n < 2:
        raise ValueError(f"--n must be >= 2 (a pair needs two responses), got {options.n}")
    if options.temperature <= 0:
        raise ValueError(f"--temperature must be > 0: {options.n} greedy responses would be identical")
    for flag, value, low in (("--max-new-tokens", options.max_new_tokens, 1), ("--batch-size", options.batch_size, 1),
                             ("--num-prompts", options.num_prompts or 1, 1), ("--seed", options.seed, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not options.tie_tolerance >= 0:
        raise ValueError(f"--tie-tolerance must be >= 0, got {options.tie_tolerance}")
    if Path(options.out).suffix != ".jsonl":
        raise ValueError(f"--out {options.out}: write the pairs to a .jsonl file")


def choose_pair(scores: list[float], texts: list[str], tie_tolerance: float = 0.0) -> tuple[int, int] | str:
    """(best, worst) indices among the non-blank responses (the first of equal scores), or the
    reason the prompt gives no pair: "too_few_samples" (< 2 non-blank), "ties" (best - worst <=
    tie_tolerance), "identical_texts" (best and worst are the same text)."""
    candidates = [i for i, text in enumerate(texts) if text.strip()]
    if len(candidates) < 2:
        return "too_few_samples"
    best = max(candidates, key=lambda i: (scores[i], -i))
    worst = min(candidates, key=lambda i: (scores[i], i))
    if scores[best] - scores[worst] <= tie_tolerance:
        return "ties"
    if texts[best] == texts[worst]:
        return "identical_texts"
    return best, worst


def pair_row(prompt: Any, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> dict[str, Any]:
    """One pairwise row; a conversational prompt's responses are assistant messages."""
    wrap = (lambda text: [{"role": "assistant", "content": text}]) if isinstance(prompt, list) else (lambda t: t)
    return {"prompt": prompt, "chosen": wrap(chosen), "rejected": wrap(rejected),
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def best_worst_pairs(prompts: list[Any], texts: list[list[str]], scores: list[list[float]],
                     tie_tolerance: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One best-vs-worst pair per prompt (`choose_pair`) and the skipped prompts by reason."""
    pairs, skipped = [], dict.fromkeys(SKIP_REASONS, 0)
    for prompt, group, row_scores in zip(prompts, texts, scores, strict=True):
        choice = choose_pair(row_scores, group, tie_tolerance)
        if isinstance(choice, str):
            skipped[choice] += 1
            continue
        best, worst = choice
        pairs.append(pair_row(prompt, group[best], group[worst], row_scores[best], row_scores[worst]))
    return pairs, skipped


def load_prompt_rows(source: str, limit: int | None) -> list[dict[str, Any]]:
    """The rows of a prompt dataset (each needs a non-empty `prompt`), the first `limit` of them."""
    table = load_rows(source)
    for i, row in enumerate(table.rows):
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()) and not is_conversational(prompt):
            raise table.error(i, "--prompts needs a non-empty 'prompt' column (text or a list of messages)")
    rows = list(table.rows)
    return rows[:limit] if limit else rows


def score_samples(reward: Any, rows: list[dict[str, Any]], texts: list[list[str]]) -> torch.Tensor:
    """Every response's score, (P, n), the reward called as the online loop calls it."""
    n = len(texts[0])
    flat_rows = [row for row in rows for _ in range(n)]
    columns_per_row = [reward_columns(row) for row in flat_rows]
    keys = {key for columns in columns_per_row for key in columns}
    columns = {key: [c.get(key) for c in columns_per_row] for key in keys}
    prompts = [prompt_text(row["prompt"]) for row in flat_rows]
    scores, _ = RewardRunner(reward, timeout=None)(prompts, [t for group in texts for t in group], columns)
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"--reward gives scores of shape {shape}; labelling pairs needs one score per response")
    return scores.reshape(len(rows), n).double()


def run_label(options: LabelOptions) -> dict[str, Any]:
    """Sample, score, pair and write (see the module docstring); returns the manifest."""
    check_options(options)
    factors = parse_factors(options.lexicographic) if options.lexicographic is not None else None
    rows = load_prompt_rows(options.prompts, options.num_prompts)
    rewards = [load_scorer(f.spec) for f in factors] if factors else [load_scorer(options.reward)]
    model, tokenizer = load_policy(options.model)
    prompts = [row["prompt"] for row in rows]
    progress = not options.no_progress and sys.stderr.isatty()
    with progress_bar(progress, "sampling", len(prompts), "prompt") as bar:
        samples = sample(model, tokenizer, encode_prompts(tokenizer, prompts), options.n,
                         max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                         top_p=options.top_p, seed=options.seed, max_batch_size=options.batch_size, progress=bar)
    factor_scores = torch.stack([score_samples(reward, rows, samples.texts) for reward in rewards], dim=-1)
    scores = factor_scores[..., 0]  # (P, n): the reward, or the first factor
    logged = {name: values for reward in rewards if callable(getattr(reward, "drain", None))
              for name, values in reward.drain().items()}
    lexicographic: dict[str, Any] = {}
    if factors:  # HERON: ordered factors with tolerances (alignkit.lab.lexicographic)
        pairs, lexicographic = lexicographic_label(prompts, samples.texts, factor_scores, factors,
                                                   options.pairing or "all")
        skipped = {reason: lexicographic.pop(reason) for reason in SKIP_REASONS}
    else:
        pairs, skipped = best_worst_pairs(prompts, samples.texts, scores.tolist(), options.tie_tolerance)
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    manifest = {
        "command": "alignkit label",
        "settings": asdict(options),
        "counts": {"prompts": len(prompts), "pairs": len(pairs), **skipped,
                   "blank_samples": sum(not t.strip() for group in samples.texts for t in group),
                   "truncated_samples": sum(samples.truncated)},
        "scores": {"mean_all": scores.mean().item(),
                   "mean_chosen": sum(p["score_chosen"] for p in pairs) / len(pairs) if pairs else None,
                   "mean_rejected": sum(p["score_rejected"] for p in pairs) / len(pairs) if pairs else None},
        "reward_logged": {name: values.double().mean().item() for name, values in logged.items()},
        **({"lexicographic": {"factors": [asdict(f) for f in factors], **lexicographic}} if factors else {}),
        "pairs_file": str(out),
    }
    manifest_path = out.with_name(out.stem + ".manifest.json")
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    counts = manifest["counts"]
    print(f"{counts['pairs']} pairs from {counts['prompts']} prompts x {options.n} responses; skipped: "
          + ", ".join(f"{counts[reason]} {reason}" for reason in SKIP_REASONS)
          + f" ({counts['blank_samples']} blank responses)")
    for name, mean in manifest["reward_logged"].items():
        print(f"{name}: mean {mean:.4f}")
    print(f"written: {out}, {manifest_path}")
    return manifest


def main(argv: list[str]) -> int:
    import tyro

    run_label(tyro.cli(LabelOptions, args=argv, prog="alignkit label", description=__doc__.split("\n\n")[0]))
    return 0


__all__ = ["LabelOptions", "choose_pair", "pair_row", "run_label"]
