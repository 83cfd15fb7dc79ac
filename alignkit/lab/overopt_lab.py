"""`alignkit overopt`: the reward over-optimisation lab of Gao et al. 2022 on one machine.

1. sample a fixed pool of N = n_max completions per prompt from the initial model;
2. score the pool with the proxy and the gold reward;
3. best-of-n for every n <= N with the unbiased estimator (`overopt.best_of_n_values`),
   at the analytic distance d = sqrt(log n - (n - 1) / n);
4. for each RL checkpoint given: sample, score proxy and gold, and estimate
   KL(checkpoint || initial) from the checkpoint's own samples (k1, `eval.kl`); d = sqrt(KL);
5. fit R_bon(d) = d (alpha - beta d) and R_RL(d) = d (alpha - beta log d) to the proxy and
   gold rewards minus the initial model's, and plot both with their fits.

Embedded default (so it runs on CPU in minutes): SmolLM2-135M-Instruct on the built-in movie
prompts; gold = VADER sentiment of the whole review; proxy = VADER of the first 8 words only
(`vader_prefix:8`). Gao et al.'s proxy is a smaller reward model trained on gold labels: it
agrees with the gold on typical samples and is wrong where it does not look. A prefix reward
is a transparent stand-in for a reward model with a short context window: it is correlated
with the gold, and optimising it selects reviews that open enthusiastically whatever they say
next. Any reward spec (`load_reward`) or saved reward-model directory works for either role.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.agents.reward_specs import load_reward  # rewards.load_reward + rlhs:CONFIG.yaml
from alignkit.data import builtin_prompts, load_rows
from alignkit.eval.kl import response_logps, sequence_kl
from alignkit.eval.overopt import bon_curve, fit_overoptimization
from alignkit.eval.plots import plot_overoptimization
from alignkit.eval.stats import format_table
from alignkit.lab.generation_eval import encode_prompts, first_scores, prompt_text, sample
from alignkit.lab.policy_loading import checkpoint_step, load_policy
from alignkit.models import load_model
from alignkit.rewards import VaderSentiment
from alignkit.rewards.saved import load_reward_model

log = logging.getLogger("alignkit")


@dataclass
class OveroptOptions:
    """`alignkit overopt` options; defaults run on the embedded model in a few CPU minutes."""

    proxy: str = "vader_prefix:8"
    """Proxy reward optimised by best-of-n / RL: a reward spec, `vader_prefix:WORDS` or a
    reward-model directory."""
    gold: str = "vader"
    """Gold reward that plays the human: same forms as --proxy."""
    model: str = "smollm2-135m"
    """Initial policy: samples the best-of-n pool and is the KL reference for checkpoints."""
    prompts: str = "builtin"
    """Prompt-only dataset (a `prompt` column) or `builtin` (the demo's held-out prompts)."""
    num_prompts: int = 8
    """How many prompts to use (the first ones)."""
    n_max: int = 64
    """Pool size N per prompt; best-of-n curves cover n = 1..N."""
    checkpoints: list[str] = field(default_factory=list)
    """RL checkpoints (RUN/checkpoints/step-*, RUN/final, or from_pretrained directories)."""
    rl_samples: int = 8
    """Samples per prompt for each checkpoint."""
    max_new_tokens: int = 32
    """Length limit of every sample."""
    temperature: float = 1.0
    """Sampling temperature (1 = the policy itself, as the analytic best-of-n KL assumes)."""
    output: str = "runs/alignkit-overopt"
    """Directory for overopt.json, pool.jsonl and the PNG plots."""
    seed: int = 0
    """Sampling seed."""
    max_batch_size: int = 64
    """Samples decoded together."""


class PrefixReward:
    """A reward applied to the first `words` whitespace words of each completion only.

    r_prefix(x, y) = r(x, first_words(y, words)). With r = VADER this is the default proxy of
    `alignkit overopt`: a stand-in for a reward model whose context window cuts the response.
    """

    def __init__(self, reward: Any, words: int) -> None:
        if words < 1:
            raise ValueError(f"words must be >= 1; got {words}")
        self.reward, self.words = reward, words
        self.__name__ = f"prefix{words}"

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> torch.Tensor:
        cut = [" ".join(text.split()[: self.words]) for text in completions]
        return self.reward(prompts, cut, **columns)


def load_scorer(spec: str) -> Any:
    """A reward function from `vader_prefix:WORDS`, a reward-model directory or a reward spec."""
    name, _, argument = spec.partition(":")
    if name == "vader_prefix":
        return PrefixReward(VaderSentiment(), int(argument or 8))
    if Path(spec).is_dir():
        return load_reward_model(spec)
    return load_reward(spec)


def load_prompt_list(source: str, limit: int | None = None) -> list[Any]:
    """`builtin` -> the demo's held-out movie prompts; else the `prompt` column of a dataset."""
    if source == "builtin":
        prompts: list[Any] = list(builtin_prompts()["heldout"])
    else:
        table = load_rows(source)
        missing = [i for i, row in enumerate(table.rows) if "prompt" not in row]
        if missing:
            raise table.error(missing[0], "a prompt-only dataset needs a 'prompt' column")
        prompts = [row["prompt"] for row in table.rows]
    return prompts[:limit] if limit else prompts


def _rl_point(
    path: str,
    initial: Any,
    tokenizer: Any,
    prompts: list[Any],
    proxy: Any,
    gold: Any,
    options: OveroptOptions,
) -> dict[str, Any]:
    model, _ = load_policy(path, device=str(next(initial.parameters()).device))
    ids = encode_prompts(tokenizer, prompts)
    drawn = sample(
        model,
        tokenizer,
        ids,
        options.rl_samples,
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        seed=options.seed + 1,
        max_batch_size=options.max_batch_size,
    )
    rows = (drawn.input_ids, drawn.attention_mask, drawn.response_mask)
    kl = sequence_kl(
        drawn.logprobs,  # the sampler's own log-probs at the sampling temperature
        response_logps(initial, *rows, temperature=options.temperature, group_size=options.rl_samples),
        drawn.response_mask,
    )
    flat_prompts = [prompt_text(p) for p in prompts for _ in range(options.rl_samples)]
    flat = [t for g in drawn.texts for t in g]
    k1 = float(kl["k1"].mean())
    del model
    return {
        "checkpoint": str(path),
        "step": checkpoint_step(path),
        "kl": k1,
        "kl_k3": float(kl["k3"].mean()),
        "d": float(np.sqrt(max(k1, 0.0))),
        "proxy": float(first_scores(proxy, flat_prompts, flat).mean()),
        "gold": float(first_scores(gold, flat_prompts, flat).mean()),
    }


def _fits(d: np.ndarray, proxy: np.ndarray, gold: np.ndarray, form: str) -> dict[str, Any]:
    if len(d) < 2:
        return {"proxy": None, "gold": None}
    return {
        "proxy": fit_overoptimization(d, proxy, form),
        "gold": fit_overoptimization(d, gold, form),
    }


def run_overopt(options: OveroptOptions) -> dict[str, Any]:
    """Run steps 1-5 of the module docstring; write DIR/overopt.json, pool.jsonl, PNGs."""
    started = time.perf_counter()
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    proxy, gold = load_scorer(options.proxy), load_scorer(options.gold)
    prompts = load_prompt_list(options.prompts, options.num_prompts)
    initial, tokenizer = load_model(options.model)

    # 1-2. the pool, scored by both rewards
    log.info(
        "[overopt] sampling a pool of %d x %d completions from %s",
        len(prompts),
        options.n_max,
        options.model,
    )
    pool = sample(
        initial,
        tokenizer,
        encode_prompts(tokenizer, prompts),
        options.n_max,
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        seed=options.seed,
        max_batch_size=options.max_batch_size,
    )
    texts = [t for g in pool.texts for t in g]
    flat_prompts = [prompt_text(p) for p in prompts for _ in range(options.n_max)]
    proxy_pool = first_scores(proxy, flat_prompts, texts).reshape(len(prompts), options.n_max)
    gold_pool = first_scores(gold, flat_prompts, texts).reshape(len(prompts), options.n_max)
    with open(output / "pool.jsonl", "w") as handle:
        for i, (prompt, text) in enumerate(zip(flat_prompts, texts, strict=True)):
            row = {
                "prompt": prompt,
                "completion": text,
                "proxy": proxy_pool.flat[i],
                "gold": gold_pool.flat[i],
            }
            handle.write(json.dumps(row) + "\n")
    proxy_0, gold_0 = float(proxy_pool.mean()), float(gold_pool.mean())

    # 3. best-of-n
    bon = bon_curve(proxy_pool, gold_pool)
    d_bon = np.array(bon["d"])
    bon["proxy_relative"] = (np.array(bon["proxy"]) - proxy_0).tolist()
    bon["gold_relative"] = (np.array(bon["gold"]) - gold_0).tolist()
    bon_fits = _fits(d_bon, np.array(bon["proxy_relative"]), np.array(bon["gold_relative"]), "bon")
    correlation = None  # undefined when either reward is constant over the pool
    if proxy_pool.std() > 0 and gold_pool.std() > 0:
        correlation = float(np.corrcoef(proxy_pool.ravel(), gold_pool.ravel())[0, 1])
    plots = [
        str(
            plot_overoptimization(
                d_bon,
                bon["proxy_relative"],
                bon["gold_relative"],
                output / "overopt_bon.png",
                proxy_fit=bon_fits["proxy"],
                gold_fit=bon_fits["gold"],
                title=f"Best-of-n against {options.proxy} (n = 1..{options.n_max}, {len(prompts)} prompts)",
                proxy_label=f"proxy {options.proxy}",
                gold_label=f"gold {options.gold}",
            )
        )
    ]

    # 4-5. RL checkpoints
    rl_points: list[dict[str, Any]] = []
    for path in options.checkpoints:
        log.info("[overopt] checkpoint %s", path)
        rl_points.append(_rl_point(path, initial, tokenizer, prompts, proxy, gold, options))
    rl_points.sort(key=lambda p: (p["step"] is None, p["step"] or 0))
    rl_fits: dict[str, Any] = {"proxy": None, "gold": None}
    if rl_points:
        d_rl = np.array([0.0] + [p["d"] for p in rl_points])
        proxy_rl = np.array([0.0] + [p["proxy"] - proxy_0 for p in rl_points])
        gold_rl = np.array([0.0] + [p["gold"] - gold_0 for p in rl_points])
        rl_fits = _fits(d_rl, proxy_rl, gold_rl, "rl")
        labels = ["init"] + [
            f"step {p['step']}" if p["step"] is not None else Path(p["checkpoint"]).name
            for p in rl_points
        ]
        plots.append(
            str(
                plot_overoptimization(
                    d_rl,
                    proxy_rl,
                    gold_rl,
                    output / "overopt_rl.png",
                    proxy_fit=rl_fits["proxy"],
                    gold_fit=rl_fits["gold"],
                    annotations=labels,
                    title=f"RL checkpoints optimising {options.proxy} ({len(prompts)} prompts)",
                    proxy_label=f"proxy {options.proxy}",
                    gold_label=f"gold {options.gold}",
                )
            )
        )

    def fit_dict(fits: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to_dict() if v is not None else None) for k, v in fits.items()}

    result = {
        "settings": asdict(options),
        "initial": {"proxy": proxy_0, "gold": gold_0, "proxy_gold_correlation": correlation},
        "bon": {**bon, "fits": fit_dict(bon_fits)},
        "rl": {"points": rl_points, "fits": fit_dict(rl_fits)},
        "plots": plots,
        "seconds": time.perf_counter() - started,
    }
    (output / "overopt.json").write_text(json.dumps(_json_safe(result), indent=2))
    _print_summary(result)
    return result


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _print_summary(result: dict[str, Any]) -> None:
    bon = result["bon"]
    rows = []
    for n in sorted({1, 2, 4, 8, 16, 32, 64, len(bon["n"])} & set(bon["n"])):
        i = bon["n"].index(n)
        rows.append(
            {
                "policy": f"best-of-{n}",
                "KL": bon["kl"][i],
                "proxy": bon["proxy"][i],
                "gold": bon["gold"][i],
            }
        )
    for p in result["rl"]["points"]:
        rows.append(
            {
                "policy": f"RL step {p['step']}",
                "KL": p["kl"],
                "proxy": p["proxy"],
                "gold": p["gold"],
            }
        )
    print(format_table(rows, ["policy", "KL", "proxy", "gold"]))
    for kind in ("bon", "rl"):
        for reward, fit in result[kind]["fits"].items():
            if fit:
                print(
                    f"{kind} fit, {reward}: alpha = {fit['alpha']:.4f}, beta = {fit['beta']:.4f}, "
                    f"rmse = {fit['rmse']:.4f}"
                )
    print(f"plots: {', '.join(result['plots'])}  |  {result['seconds']:.0f} s")


def main(argv: list[str]) -> int:
    import tyro

    run_overopt(
        tyro.cli(
            OveroptOptions, args=argv, prog="alignkit overopt", description=__doc__.split("\n\n")[0]
        )
    )
    return 0
