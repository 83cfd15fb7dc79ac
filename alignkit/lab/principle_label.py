"""`alignkit label-principles`: SALMON's synthetic principle-driven preference pairs (Sun et
al. 2023, github.com/IBM/SALMON training/step1_synthetic_preference_collection) for
`alignkit train rm_principles`.

    alignkit label-principles --prompts P.jsonl --model M --principles principles.json --out pairs.jsonl

1. sample two responses per prompt from `--model` (the rollout engine, as `alignkit label`);
2. ask the judge (`--judge`, default the same base model) which response better follows the
   principles, in BOTH orders: `judge_prompt` ends in "... is Response (" and the judge's
   log-probabilities of "a" and "b" as the next text give d_ab = log p(a) - log p(b) with the
   pair as (y1, y2), and d_ba with it as (y2, y1);
3. y1 is preferred when d_ab > 0 and d_ba < 0 (both orders agree), y2 when d_ab < 0 and
   d_ba > 0; otherwise the judge contradicts itself under the swap (position bias) and the
   prompt is skipped and counted (`inconsistent`), as SALMON's script keeps preference 0 for
   such pairs; `margin` = (d_ab - d_ba) / 2;
4. write pairwise rows (`prompt`, `chosen`, `rejected`, `principles`, `margin`) and
   OUT_STEM.manifest.json beside them. With `--principle-subsets N` (SALMON's RM data) every
   principle is judged alone and each pair gives N rows, each under a random subset of the
   principles (some replaced by their `negative_definition`), labelled by the dominant one
   (`principle_subsets`).

Checked against SALMON's code: the judge is the base model itself, one query per principle
("dimension: definition", prompts/synthetic_preference_prompt.txt) in both orders, preference
from the next-token logits of "a" vs "b", kept only when both orders agree. `--per-principle`
does as SALMON does (one judgement and one row per principle); the default judges the whole
list at once. OUR DEVIATIONS: the judge prompt is our own wording (same structure: instruction,
output a, output b, the principles, then the answer prefix); we compare the log-probabilities of
the continuations "a" and "b" (all their tokens) rather than one vocabulary entry each, so any
tokenizer works; SALMON samples its two responses from different prompts of one policy, we
sample both from `--model` at `--temperature`.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.lab.generation_eval import encode_prompts, progress_bar, prompt_text, sample
from alignkit.lab.label import load_prompt_rows, pair_row
from alignkit.lab.policy_loading import load_policy
from alignkit.models import sequence_logps
from alignkit.rewards.principles import format_principles, load_principles

JUDGE_TEMPLATE = (
    "You compare two responses of an AI assistant to the same instruction and decide which one "
    "better follows the principles.\n\n{principles}\n\n### Instruction\n{instruction}\n\n"
    "### Response (a)\n{a}\n\n### Response (b)\n{b}\n\n"
    "The response that better follows the principles is Response ("
)


@dataclass
class PrincipleLabelOptions:
    """`alignkit label-principles` options."""

    prompts: str
    """Prompt-only dataset (`prompt` column, text or conversational)."""
    model: str
    """The base model sampled for the two responses (and the judge unless --judge is given)."""
    principles: str
    """The principles: a text file or JSON (a list of strings or SALMON's [{dimension, definition}])."""
    out: str
    """The pairs file (JSONL); OUT_STEM.manifest.json is written beside it."""
    judge: str | None = None
    """The model that judges the pairs (default: --model, as in SALMON)."""
    per_principle: bool = False
    """One judgement and one row per principle (SALMON), instead of one for the whole list."""
    principle_subsets: int = 0
    """SALMON's RM data (`principle_subsets`): judge each principle, then write N rows per pair,
    each under a random subset of the principles with the dominant one's preference."""
    max_principles: int = 8
    """With --principle-subsets: the most principles in one row's subset (SALMON: 8)."""
    num_prompts: int | None = None
    """Use only the first N prompts."""
    max_new_tokens: int = 48
    """Length limit of every response."""
    temperature: float = 1.0
    """Sampling temperature (> 0: two greedy responses would be the same)."""
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    """Most sequences decoded or judged at once."""
    no_progress: bool = False


def judge_prompt(instruction: str, first: str, second: str, principles: Any) -> str:
    """The judge's text for one order of a pair (the answer is the next letter, a or b)."""
    return JUDGE_TEMPLATE.format(principles=format_principles(principles), instruction=instruction, a=first, b=second)


def letter_log_probs(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> torch.Tensor:
    """(N, 2): log p("a" | text) and log p("b" | text), each the sum over the letter's tokens."""
    device = next(model.parameters()).device
    rows = []
    for text in texts:
        context = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        for letter in ("a", "b"):
            full = list(tokenizer(text + letter, add_special_tokens=True)["input_ids"])
            shared = next((i for i, (x, y) in enumerate(zip(context, full, strict=False)) if x != y), len(context))
            rows.append((full, max(1, min(shared, len(full) - 1))))
    values = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            answer = torch.zeros((len(chunk), width), dtype=torch.long)
            for n, (ids, first) in enumerate(chunk):
                input_ids[n, :len(ids)] = torch.tensor(ids)
                attention[n, :len(ids)] = 1
                answer[n, first:len(ids)] = 1
            logps, _ = sequence_logps(model, input_ids.to(device), attention.to(device), answer.to(device))
            values.append(logps.float().cpu())
    return torch.cat(values).reshape(len(texts), 2)


def judge_pairs(model: Any, tokenizer: Any, instructions: list[str], firsts: list[str], seconds: list[str],
                principles: list[Any], batch_size: int = 16) -> list[tuple[int | None, float]]:
    """Per pair (1 or 2 = the preferred response, None when the two orders disagree; margin)."""
    texts = []
    for instruction, a, b, p in zip(instructions, firsts, seconds, principles, strict=True):
        texts += [judge_prompt(instruction, a, b, p), judge_prompt(instruction, b, a, p)]
    logps = letter_log_probs(model, tokenizer, texts, batch_size)
    differences = (logps[:, 0] - logps[:, 1]).reshape(-1, 2)  # (pairs, [ab order, ba order])
    verdicts = []
    for d_ab, d_ba in differences.tolist():
        preferred = 1 if d_ab > 0 and d_ba < 0 else 2 if d_ab < 0 and d_ba > 0 else None
        verdicts.append((preferred, (d_ab - d_ba) / 2))
    return verdicts


def negated(principle: Any) -> Any:
    """A principle's `negative_definition` in its place (SALMON's negative principles)."""
    return {"dimension": principle["dimension"], "definition": principle["negative_definition"]}


def principle_subsets(margins: list[list[float]], principles: list[Any], rows_per_pair: int,
                      max_principles: int = 8, seed: int = 0) -> list[tuple[int, list[Any], int, float]]:
    """SALMON's aggregation of per-principle judgements into RM training rows (IBM/SALMON
    training/step2_rm_training/aggregate_synthetic_preference.py).

    `margins[i][k]`: pair i's margin under principle k (> 0: response 1 better; 0: the judge's
    two orders disagreed). Each principle's margins are divided by their variance over the
    pairs (SALMON normalises so). For every pair, `rows_per_pair` times: draw a subset size
    from Geometric(0.2) (redrawn while above max_principles or the number of principles), a
    random subset of that size, and negate each principle that has a `negative_definition`
    with probability 1/2 (its margin changes sign); the row's preference is the sign of the
    dominant principle's margin (largest |normalised margin|), its strength that magnitude; a
    dominant margin of 0 gives no row. Returns (pair index, principle subset, 1 or 2, strength).
    OUR DEVIATIONS: SALMON's extra rules (penalising "As an AI language model", a language
    mismatch) and its 10% label noise are left out.
    """
    rng, count = random.Random(seed), len(principles)
    variances = []
    for k in range(count):
        column = [row[k] for row in margins]
        mean = sum(column) / max(len(column), 1)
        variance = sum((v - mean) ** 2 for v in column) / max(len(column), 1)
        variances.append(variance if variance > 0 else 1.0)
    rows = []
    for _ in range(rows_per_pair):
        for i, row in enumerate(margins):
            size = count + 1
            while size > min(max_principles, count):
                size = 1
                while rng.random() >= 0.2:
                    size += 1
            subset, signed = rng.sample(range(count), size), []
            for k in subset:
                flip = isinstance(principles[k], dict) and "negative_definition" in principles[k] and rng.random() < 0.5
                signed.append((-row[k] / variances[k] if flip else row[k] / variances[k], flip))
            dominant = max(range(size), key=lambda j: abs(signed[j][0]))
            score = signed[dominant][0]
            if score == 0:
                continue
            chosen = [negated(principles[k]) if flip else principles[k] for k, (_, flip) in zip(subset, signed, strict=True)]
            rows.append((i, chosen, 1 if score > 0 else 2, abs(score)))
    return rows


def run_principle_label(options: PrincipleLabelOptions) -> dict[str, Any]:
    """Sample, judge in both orders, keep the consistent pairs, write (module docstring)."""
    if options.temperature <= 0:
        raise ValueError("--temperature must be > 0: two greedy responses would be identical")
    if Path(options.out).suffix != ".jsonl":
        raise ValueError(f"--out {options.out}: write the pairs to a .jsonl file")
    principles = load_principles(options.principles)
    per_principle = options.per_principle or options.principle_subsets > 0
    if per_principle and not isinstance(principles, list):
        raise ValueError(f"--per-principle and --principle-subsets need a JSON list of principles; "
                         f"{options.principles} is one text")
    if options.principle_subsets < 0 or options.max_principles < 1:
        raise ValueError("--principle-subsets must be >= 0 and --max-principles >= 1")
    sets = [[item] for item in principles] if per_principle else [principles]
    rows = load_prompt_rows(options.prompts, options.num_prompts)
    model, tokenizer = load_policy(options.model)
    judge, judge_tokenizer = (model, tokenizer) if options.judge is None else load_policy(options.judge)
    prompts = [row["prompt"] for row in rows]
    with progress_bar(not options.no_progress and sys.stderr.isatty(), "sampling", len(prompts), "prompt") as bar:
        samples = sample(model, tokenizer, encode_prompts(tokenizer, prompts), 2, max_new_tokens=options.max_new_tokens,
                         temperature=options.temperature, top_p=options.top_p, seed=options.seed,
                         max_batch_size=options.batch_size, progress=bar)
    usable = [i for i, (a, b) in enumerate(samples.texts) if a.strip() and b.strip() and a != b]
    jobs = [(i, s) for i in usable for s in sets]
    verdicts = judge_pairs(judge, judge_tokenizer, [prompt_text(prompts[i]) for i, _ in jobs],
                           [samples.texts[i][0] for i, _ in jobs], [samples.texts[i][1] for i, _ in jobs],
                           [s for _, s in jobs], options.batch_size)
    labelled = [(i, s, preferred, abs(margin)) for (i, s), (preferred, margin) in zip(jobs, verdicts, strict=True)
                if preferred is not None]
    if options.principle_subsets > 0:  # per pair, one signed margin per principle (0: inconsistent)
        margins = [[0.0 if p is None else m for p, m in verdicts[n * len(sets):(n + 1) * len(sets)]]
                   for n in range(len(usable))]
        labelled = [(usable[n], subset, preferred, strength) for n, subset, preferred, strength in principle_subsets(
            margins, principles, options.principle_subsets, options.max_principles, options.seed)]
    pairs = []
    for i, principle_set, preferred, margin in labelled:
        a, b = samples.texts[i]
        chosen, rejected = (a, b) if preferred == 1 else (b, a)
        row = pair_row(prompts[i], chosen, rejected, margin, -margin)
        row = {key: row[key] for key in ("prompt", "chosen", "rejected")}
        pairs.append({**row, "principles": principle_set, "margin": margin})
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    manifest = {
        "command": "alignkit label-principles",
        "settings": asdict(options),
        "counts": {"prompts": len(prompts), "judged": len(jobs), "pairs": len(pairs),
                   "inconsistent": sum(v[0] is None for v in verdicts),
                   "unusable_samples": len(prompts) - len(usable)},
        "pairs_file": str(out),
    }
    manifest_path = out.with_name(out.stem + ".manifest.json")
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    counts = manifest["counts"]
    print(f"{counts['pairs']} pairs from {counts['judged']} judgements ({counts['inconsistent']} inconsistent "
          f"under the swap, {counts['unusable_samples']} prompts with blank or identical samples)")
    print(f"written: {out}, {manifest_path}")
    return manifest


def main(argv: list[str]) -> int:
    import tyro

    run_principle_label(tyro.cli(PrincipleLabelOptions, args=argv, prog="alignkit label-principles",
                                 description=__doc__.split("\n\n")[0]))
    return 0


__all__ = ["PrincipleLabelOptions", "judge_pairs", "judge_prompt", "principle_subsets", "run_principle_label"]
