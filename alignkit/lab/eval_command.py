"""`alignkit eval`: sample a model on prompts and report gold reward, KL, win rate, length and
diversity (`evaluate_model`), written to DIR/eval.json and printed as a table."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.eval.stats import format_table
from alignkit.lab.generation_eval import evaluate_model
from alignkit.lab.overopt_lab import load_prompt_list, load_scorer
from alignkit.lab.policy_loading import base_model_of, load_policy
from alignkit.models import is_peft
from alignkit.rewards.judge import LLMJudge, PairwiseLLMJudge
from alignkit.rewards.preference import PreferenceJudge

log = logging.getLogger("alignkit")


@dataclass
class EvalOptions:
    """`alignkit eval` options."""

    model: str
    """Policy: a model directory (e.g. RUN/final), a LoRA adapter directory, a training
    checkpoint RUN/checkpoints/step-N, a hub id or `smollm2-135m`."""
    prompts: str = "builtin"
    """Prompt-only dataset (`prompt` column, standard or conversational) or `builtin` (the
    demo's 25 held-out movie-review prompts)."""
    reward: str = "vader"
    """Gold reward: a reward spec (`vader`, `module:function`, `file.py:function`) or a saved
    reward-model directory."""
    ref: str | None = None
    """Reference for KL and win rate. Default: the adapter-disabled base of a LoRA policy, else
    the model recorded in the run's config.yaml (for RUN/final and checkpoints), else none."""
    judge: str | None = None
    """Win-rate judge: a preference-model directory (`prob(prompts, a, b)`), a reward spec or a
    reward-model directory. Default: the gold reward."""
    samples: int = 4
    """Samples per prompt (>= 2 for per-input diversity)."""
    num_prompts: int | None = None
    """Use only the first N prompts."""
    max_new_tokens: int = 48
    """Length limit of every sample."""
    temperature: float = 1.0
    """Sampling temperature for the policy and the reference alike."""
    top_p: float = 1.0
    """Nucleus sampling (keep 1.0 for an exact KL estimate)."""
    seed: int = 0
    """Sampling and bootstrap seed."""
    lc_method: Literal["logistic", "linear"] = "logistic"
    """Length-controlled win rate regression: logistic or linear."""
    no_embeddings: bool = False
    """Skip the MiniLM embedding diversity."""
    no_progress: bool = False
    """Hide the progress bars of sampling and scoring (they are off when stderr is not a terminal)."""
    output: str = "runs/alignkit-eval"
    """Directory for eval.json."""


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (progress bars are shown only there)."""
    return sys.stderr.isatty()


def load_judge(spec: str) -> Any:
    """A preference-model directory -> `PreferenceJudge`; a pairwise LLM judge
    (`judge:MODEL,mode=pairwise`) -> its symmetrised P(a > b) as the judge's `prob`; anything
    else -> a reward scorer."""
    if (Path(spec) / "preference_model.json").is_file():
        return PreferenceJudge(spec)
    scorer = load_scorer(spec)
    if isinstance(scorer, LLMJudge) and scorer.mode == "pairwise":
        return PairwiseLLMJudge(scorer)
    return scorer


def run_eval(options: EvalOptions) -> dict[str, Any]:
    prompts = load_prompt_list(options.prompts, options.num_prompts)
    model, tokenizer = load_policy(options.model)
    reference: Any = None
    reference_name = options.ref
    if options.ref is not None:
        reference = load_policy(options.ref, device=str(next(model.parameters()).device))[0]
    elif is_peft(model):
        reference, reference_name = "adapter", "base (adapter disabled)"
    elif base_model_of(options.model) is not None:
        reference_name = base_model_of(options.model)
        reference = load_policy(reference_name, device=str(next(model.parameters()).device))[0]
    else:
        log.warning("no reference model (--ref): KL and win rate are left out")
    result = evaluate_model(
        model,
        tokenizer,
        prompts,
        reward=load_scorer(options.reward),
        reference=reference,
        judge=load_judge(options.judge) if options.judge else None,
        samples=options.samples,
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=options.seed,
        embedder=None if options.no_embeddings else "minilm",
        lc_method=options.lc_method,
        name=options.model,
        reference_name=reference_name,
        progress=not options.no_progress and stderr_is_tty(),
    )
    result["settings"].update(asdict(options))
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(result, indent=2))
    print(summary_table(result))
    print(f"\nwritten: {output / 'eval.json'}")
    return result


def _ci(point: Any, low: Any, high: Any) -> str:
    return "-" if point is None else f"{point:+.4f} [{low:+.4f}, {high:+.4f}]"


def summary_table(result: dict[str, Any]) -> str:
    """The policy (and reference) side by side: reward, KL, win rate, length, diversity."""

    def row(name: str, r: dict[str, Any], is_policy: bool) -> dict[str, Any]:
        div = (r.get("diversity") or {}) if isinstance(r.get("diversity"), dict) else {}
        per, across = div.get("per_input") or {}, div.get("across_input") or {}
        return {
            "model": name,
            "gold reward [95% CI]": _ci(r["gold_reward"], r["ci_low"], r["ci_high"]),
            "KL k1 (k3)": f"{r['kl']:.3f} ({r['kl_k3']:.3f})"
            if is_policy and r.get("kl") is not None
            else "-",
            "win rate [CI] / LC": (
                f"{r['win_rate']:.3f} [{r['win_rate_ci_low']:.3f}, {r['win_rate_ci_high']:.3f}] / {r['lc_win_rate']:.3f}"
                if is_policy and r.get("win_rate") is not None
                else "-"
            ),
            "tokens": f"{r['mean_length_tokens']:.1f}",
            "words": f"{r['mean_length_words']:.1f}",
            "EAD per/across": f"{per.get('ead', float('nan')):.3f} / {across.get('ead', float('nan')):.3f}",
            "emb. div per/across": (
                f"{per['embedding']:.3f} / {across.get('embedding', float('nan')):.3f}"
                if "embedding" in per
                else "-"
            ),
        }

    rows = [row("policy", result, True)]
    if result.get("reference_metrics"):
        rows.append(row(f"reference ({result['reference']})", result["reference_metrics"], False))
    return format_table(rows)


def main(argv: list[str]) -> int:
    import tyro

    run_eval(
        tyro.cli(EvalOptions, args=argv, prog="alignkit eval", description=__doc__.split("\n\n")[0])
    )
    return 0
