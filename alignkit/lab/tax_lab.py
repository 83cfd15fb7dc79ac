"""`alignkit tax`: the alignment tax (Lin et al. 2024) of one or more models against a base.

For each model given (the first is the base):
1. capability: next-token NLL of every passage of a held-out general-text set (shipped:
   200 short passages of facts, instructions, narrative, dialogue, everyday notices and code;
   or --text FILE), every token scored after a document-start token (`passage_nll`);
2. reward: one greedy generation per prompt (shipped movie-review prompts or --prompts FILE)
   scored by --reward (any reward spec or reward-model directory);
then NLL per token with its interval, the NLL increase over the base (paired over passages),
the reward and its increase (paired over prompts), and with 3+ models the Pareto front of
(NLL increase, reward): `alignkit.eval.tax`. Report: `alignkit.eval.tax_report`.

Feed it the checkpoints of an interpolation sweep between a base and an aligned model (e.g.
from `alignkit merge`) to trace the reward-vs-tax front of model averaging.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.eval.stats import format_table
from alignkit.eval.tax import short_names, summarise_tax
from alignkit.eval.tax_report import write_tax_report
from alignkit.lab.generation_eval import first_scores, progress_bar, prompt_text
from alignkit.lab.measure_common import (
    builtin_general_text,
    check_counts,
    check_output_dir,
    check_policy_source,
    flag_named,
    greedy_completions,
    load_id_rows,
)
from alignkit.lab.overopt_lab import load_prompt_list, load_scorer
from alignkit.lab.policy_loading import load_policy
from alignkit.models import token_logps

log = logging.getLogger("alignkit")
DESCRIPTION = ("Alignment tax: held-out next-token NLL on general text (capability) and the reward of greedy "
               "generations, for a base model and the models aligned from it; with 3+ models, the reward-vs-tax "
               "Pareto front. Writes report.html, tax.json and PNG plots to --output.")


@dataclass
class TaxOptions:
    """`alignkit tax` options."""

    models: str
    """Comma-separated models, the base first: directories (RUN/final, LoRA adapters, training
    checkpoints), hub ids or `smollm2-135m`."""
    reward: str = "vader"
    """Reward scoring the greedy generations: a reward spec (`vader`, `module:function`,
    `file.py:function`, `rm:DIR`) or a reward-model directory."""
    prompts: str = "builtin"
    """Prompt-only dataset (a `prompt` column) or `builtin` (25 held-out movie-review prompts)."""
    text: str = "builtin"
    """Held-out text: a dataset with a `text` column (optional `id`, `category`) or `builtin`
    (200 shipped general-English passages)."""
    num_prompts: int | None = None
    """Use only the first N prompts."""
    num_passages: int | None = None
    """Use only the first N passages."""
    max_new_tokens: int = 32
    """Length limit of each greedy generation."""
    max_length: int = 512
    """Tokens per passage, the start token included (longer passages are cut, and counted)."""
    batch_size: int = 16
    """Passages per forward; prompts generated together."""
    n_bootstrap: int = 2000
    """Bootstrap resamples."""
    seed: int = 0
    """Bootstrap seed."""
    output: str = "runs/alignkit-tax"
    """Directory for report.html, tax.json and the PNG plots."""
    no_progress: bool = False
    """Hide the progress bars (they are off when stderr is not a terminal)."""

    def model_list(self) -> list[str]:
        """The models in order; a directory holding an `alignkit merge --sweep` manifest.json
        stands for its checkpoints, in the manifest's order."""
        return [path for m in self.models.split(",") for path in expand_sweep(m.strip())]


def expand_sweep(name: str) -> list[str]:
    """[name], or the checkpoint directories of a merge sweep written to `name`
    (its manifest.json: {"checkpoints": [{"path": ...}, ...]}, paths relative to it)."""
    manifest = Path(name) / "manifest.json" if name else None
    if manifest is None or not manifest.is_file() or (Path(name) / "config.json").is_file():
        return [name]
    import json

    checkpoints = json.loads(manifest.read_text()).get("checkpoints")
    if not isinstance(checkpoints, list) or not checkpoints:
        raise ValueError(f"--models {name}: its manifest.json lists no checkpoints")
    return [str(Path(name) / entry["path"]) for entry in checkpoints]


def validate_tax_options(options: TaxOptions) -> None:
    """Every check that needs no model, as one-line errors naming the flag."""
    models = options.model_list()
    if any(not m for m in models):
        raise ValueError(f"--models {options.models!r}: an empty name between commas")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise ValueError(f"--models names {', '.join(repeated)} more than once")
    if len(models) < 2:
        raise ValueError("--models needs the base and at least one other model, comma-separated (base,aligned)")
    check_counts(options, ("num_prompts", "num_passages", "max_new_tokens", "batch_size", "n_bootstrap"))
    if options.max_length < 2:
        raise ValueError(f"--max-length must be >= 2 (the start token and one text token); got {options.max_length}")
    for model in models:
        check_policy_source(model, "--models")
    check_output_dir(options.output)


def document_start_token(tokenizer: Any) -> int:
    """The token every passage is scored after, so its first word is predicted too: the
    document separator `<|endoftext|>` where the vocabulary has one (GPT-2, SmolLM, Qwen
    pretraining), else bos, else eos."""
    separator = tokenizer.get_vocab().get("<|endoftext|>")
    for candidate in (separator, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has no <|endoftext|>, bos or eos token to start a passage with")


@torch.no_grad()
def passage_nll(model: Any, tokenizer: Any, texts: list[str], *, batch_size: int = 16, max_length: int = 512,
                progress: bool = False) -> dict[str, Any]:
    """Summed next-token NLL (nats) and scored-token count per passage: {"nll_sums" (P,),
    "tokens" (P,), "truncated" (passages cut to max_length tokens)}.

    Passage p is [start] + tokens(text_p) (no other special tokens), cut to `max_length`;
    nll_sums[p] = -sum_{t >= 1} log p(x_t | x_<t) over its text tokens, tokens[p] their count.
    Passages run in batches of similar length, right-padded (`token_logps`: masked positions
    cost nothing past the decoder)."""
    start = document_start_token(tokenizer)
    encoded = [[start] + list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    truncated = sum(len(ids) > max_length for ids in encoded)
    encoded = [ids[:max_length] for ids in encoded]
    sums, counts = np.zeros(len(texts)), np.zeros(len(texts))
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    with progress_bar(progress, "NLL on held-out text", len(order), "passage") as bar:
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                attention_mask[row, : len(encoded[i])] = 1
            response_mask = attention_mask.bool().clone()
            response_mask[:, 0] = False  # the start token is context, not scored
            logps = token_logps(model, input_ids.to(device), attention_mask.to(device), response_mask.to(device))
            for row, i in enumerate(chunk):
                sums[i] = -float(logps[row].double().sum())
                counts[i] = int(response_mask[row].sum())
            bar.update(len(chunk))
    return {"nll_sums": sums, "tokens": counts, "truncated": truncated}


def load_passages(source: str, limit: int | None) -> list[dict[str, str]]:
    """`builtin` -> the shipped passages; else rows of a dataset with a `text` column."""
    rows = builtin_general_text() if source == "builtin" else load_id_rows(source, "text", "--text", "text")
    return rows[:limit] if limit else rows


def measure_model(name: str, passages: list[dict[str, str]], prompts: list[Any], reward: Any,
                  options: TaxOptions) -> dict[str, Any]:
    """Load one model, measure NLL on `passages` and the reward of greedy generations."""
    progress = not options.no_progress and sys.stderr.isatty()
    model, tokenizer = load_policy(name)
    model.eval()
    nll = passage_nll(model, tokenizer, [p["text"] for p in passages], batch_size=options.batch_size,
                      max_length=options.max_length, progress=progress)
    completions, cut = greedy_completions(model, tokenizer, prompts, max_new_tokens=options.max_new_tokens,
                                          batch_size=options.batch_size, progress=progress, who=name)
    del model
    gc.collect()
    texts = [prompt_text(p) for p in prompts]
    rewards = first_scores(reward, texts, completions)
    return {"name": name, **nll, "chars": [len(p["text"]) for p in passages], "rewards": rewards,
            "completions": completions, "truncated_generations": int(sum(cut))}


def run_tax(options: TaxOptions) -> dict[str, Any]:
    """Measure every model (module docstring), write the report and print the table."""
    started = time.perf_counter()
    validate_tax_options(options)
    models = options.model_list()
    with flag_named("--reward"):
        reward = load_scorer(options.reward)  # a bad spec fails before any model loads
    with flag_named("--text"):
        passages = load_passages(options.text, options.num_passages)
    with flag_named("--prompts"):
        prompts = load_prompt_list(options.prompts, options.num_prompts)
    if not prompts:
        raise ValueError(f"--prompts {options.prompts}: no prompts")
    measured = []
    for k, name in enumerate(models, start=1):
        log.info("[%d/%d] %s: NLL on %d passages, greedy generations on %d prompts", k, len(models), name,
                 len(passages), len(prompts))
        measured.append(measure_model(name, passages, prompts, reward, options))
    rows = summarise_tax(measured, [p["category"] for p in passages], n_resamples=options.n_bootstrap,
                         seed=options.seed)
    texts = [prompt_text(p) for p in prompts]
    for row, m, label in zip(rows, measured, short_names(models), strict=True):
        row["label"] = label
        row["truncated_passages"] = m["truncated"]
        row["truncated_generations"] = m["truncated_generations"]
        row["passage_nll_sums"] = m["nll_sums"].tolist()
        row["passage_tokens"] = m["tokens"].astype(int).tolist()
        row["samples"] = [{"prompt": p, "completion": c, "reward": float(r)}
                          for p, c, r in zip(texts, m["completions"], m["rewards"], strict=True)]
    same_tokens = all(np.array_equal(m["tokens"], measured[0]["tokens"]) for m in measured)
    notes = [f"{len(passages)} passages ({options.text}), {len(prompts)} prompts ({options.prompts}), "
             f"greedy generations of at most {options.max_new_tokens} tokens, reward {options.reward}"]
    if not same_tokens:
        notes.append("the models' tokenizers cut the text differently: compare NLL per character, "
                     "not per token")
    if any(m["truncated"] for m in measured):
        notes.append(f"passages longer than {options.max_length} tokens were cut: "
                     + ", ".join(f"{r['label']} {r['truncated_passages']}" for r in rows))
    results = {
        "title": "alignkit alignment tax: capability against reward",
        "task": f"base model {models[0]}; capability = held-out next-token NLL on general text; "
                f"reward = {options.reward} of greedy generations",
        "models": rows,
        "base": models[0],
        "reward": options.reward,
        "text": {"source": options.text, "passages": len(passages),
                 "categories": {c: sum(p["category"] == c for p in passages)
                                for c in dict.fromkeys(p["category"] for p in passages)},
                 "passage_ids": [p["id"] for p in passages], "same_tokenization": same_tokens},
        "prompts": {"source": options.prompts, "count": len(prompts)},
        "pareto_front": [r["name"] for r in rows if r.get("pareto")] if len(rows) >= 3 else None,
        "notes": notes,
        "settings": asdict(options),
        "seconds": time.perf_counter() - started,
    }
    paths = write_tax_report(results, options.output)
    print(tax_table(rows))
    print(f"\nreport: {paths['html']}  |  {paths['results']}")
    return results


def tax_table(rows: list[dict[str, Any]]) -> str:
    """The terminal summary: one line per model."""
    def ci(r: dict[str, Any], key: str, spec: str) -> str:
        return f"{format(r[key], spec)} [{format(r[key + '_ci_low'], spec)}, {format(r[key + '_ci_high'], spec)}]"

    table = [{"model": r["label"], "NLL/token [95% CI]": ci(r, "nll", ".4f"),
              "NLL increase [95% CI]": ci(r, "nll_increase", "+.4f"), "reward [95% CI]": ci(r, "reward", "+.3f"),
              **({"Pareto": "front" if r["pareto"] else "dominated"} if "pareto" in r else {})} for r in rows]
    return format_table(table)


def main(argv: list[str]) -> int:
    import tyro

    run_tax(tyro.cli(TaxOptions, args=argv, prog="alignkit tax", description=DESCRIPTION))
    return 0
