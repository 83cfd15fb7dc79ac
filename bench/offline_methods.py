"""Per-step cost of every offline preference method relative to `dpo`, alignkit only.

Each method trains the same random tiny Llama (float32, CPU) for `--steps` optimizer steps in a
fresh child process (this script with `--worker NAME`), in alternating order over `--rounds`;
step time = median over rounds of (end of step N - end of step 1) / (N - 1), from a callback.

    python bench/offline_methods.py                              # every method, default sizes
    python bench/offline_methods.py --steps 4 --rounds 1         # quick smoke run
    python bench/offline_methods.py --methods ipo,simpo,kto,pro --json /tmp/offline.json

Methods: every registered `pairwise`, `listwise`, `unpaired` and `pointwise` algorithm, `ift`,
`treg` and `sft` (a no-reference baseline), plus the DPO options wpo (use_weighting), tr_dpo (soft
reference sync every steps/4), ld_dpo (ld_alpha 0.5), dpo_lnorm (length_normalize) and dpo_sft
(loss_weights dpo 1 + sft 0.5).

Equivalent token counts: all data comes from the same long pairs (`_common.long_pairs`, B pairs a
step = 2B sequences), reshaped per data kind so every method trains the same 2B sequences a step:
  pairwise     B pairs (modpo: plus a random `margins` column, weights [1, 0.5]);
  unpaired     kto: 2B rows, chosen -> label True, rejected -> label False;
  listwise     B/2 rows of K = 4 completions (pairs 2j and 2j+1: both chosen and both rejected
               responses under pair 2j's prompt, scores 3, 2, 1, 0; K = 2 when B is odd);
  pointwise    alol*: 2B prompt+completion rows scored by `alignkit.testing.planted_reward` (the
               value head's reference samples are prepared before step 1, untimed); crlft: 2B rows,
               chosen -> source gpt4, rejected -> gpt3.5;
  sft / ift    2B prompt+completion rows (chosen and rejected responses).
Real tokens per step are counted from each method's own rows and printed; `x dpo / token` divides
by them, so a method whose rows hold slightly different tokens is still compared fairly (alol
trains only positive-advantage rows, so its token count is that of the mean row).

A method is flagged when its step takes > `--flag` (1.15) x dpo's by the mean step time (loop),
the median single-step time (robust to a stall on a shared CPU) and the time per real token
(a method whose own prompt template lengthens the rows, like crlft's class conditions, is
compared per token), unless its trainer documents extra forward passes (EXTRA_FORWARDS below,
quoted from the docstrings).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WORKER_ENV,
    child_env,
    count_tokens,
    emit_result,
    first_error,
    long_pairs,
    median_of,
    peak_rss_mib,
    print_table,
    ratio,
    run_rounds,
    run_worker,
    train_alignkit,
    unpaired_from_pairs,
)

KINDS = ("pairwise", "listwise", "unpaired", "pointwise")
EXTRA = ("ift", "sft", "treg")
VARIANTS = {  # name -> (algorithm, hyper-parameters); tr_dpo's period is set from --steps
    "wpo": ("dpo", {"use_weighting": True}),
    "tr_dpo": ("dpo", {"ref_sync": "soft", "ref_sync_alpha": 0.6}),
    "ld_dpo": ("dpo", {"ld_alpha": 0.5}),
    "dpo_lnorm": ("dpo", {"length_normalize": True}),
    "dpo_sft": ("dpo", {"loss_weights": {"dpo": 1.0, "sft": 0.5}}),
}
EXTRA_FORWARDS = {  # what the trainers' docstrings declare beyond one forward + backward of 2B
    "wpo": "+1 no-grad policy forward of the 2B sequences (PairwiseOptions.use_weighting)",
    "tr_dpo": "+1 no-grad forward of the live reference (PairwiseOptions.ref_sync)",
    "ift": "2 forwards + 1 backward per step (IFTTask)",
    "kto": "+1 no-grad policy and +1 reference forward of the mismatched KL rows (UnpairedTask)",
}
ALOL_OPTIONS = {"value_samples": 2, "value_max_new_tokens": 16}


def registered() -> dict[str, str]:
    """Method name -> data kind, from alignkit's registry (plus the DPO option variants)."""
    import alignkit.training.offline.loop  # noqa: F401  (fills the registry)
    from alignkit.training.run.registry import ALGORITHMS

    names = {n: s.kind for n, s in ALGORITHMS.items() if s.kind in KINDS or n in EXTRA}
    return {"dpo": "pairwise", **names, **dict.fromkeys(VARIANTS, "pairwise")}


def data_kind(name: str, kind: str) -> str:
    if kind == "pointwise":
        return "crlft" if name == "crlft" else "rewarded"
    return {"sft": "sft"}.get(kind, kind)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    parser.add_argument("--hidden-size", type=int, default=256, help="random model width")
    parser.add_argument("--num-layers", type=int, default=4, help="random model depth")
    parser.add_argument("--num-heads", type=int, default=4, help="random model attention heads")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (2B sequences)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (>= 2)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--flag", type=float, default=1.15, help="flag step time > FLAG x dpo's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--verbose", action="store_true", help="show the children's stderr")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2 and not args.worker:
        parser.error("--steps must be at least 2 (step 1 is the excluded warm-up)")
    return args


# --------------------------------------------------------------------------- data


def ranked_from_pairs(pairs: list[dict]) -> list[dict]:
    """Rows of K = 4 completions from pairs 2j, 2j+1 (scores 3 2 1 0, shuffled order)."""
    rng = random.Random(0)
    rows = []
    for a, b in zip(pairs[0::2], pairs[1::2], strict=False):
        ranked = [(a["chosen"], 3.0), (b["chosen"], 2.0), (b["rejected"], 1.0), (a["rejected"], 0.0)]
        rng.shuffle(ranked)
        rows.append({"prompt": a["prompt"], "completions": [c for c, _ in ranked],
                     "scores": [s for _, s in ranked]})
    return rows


def build_data(pairs: list[dict], batch_size: int) -> dict[str, tuple[list[dict], int]]:
    """Data kind -> (rows, batch size in rows), each batch = the same 2B sequences."""
    from alignkit.testing import planted_reward

    sft = [{"prompt": r["prompt"], "completion": r["completion"]} for r in unpaired_from_pairs(pairs)]
    rewarded = [{**r, "reward": planted_reward([r["prompt"]], [r["completion"]])[0]} for r in sft]
    crlft = [{**r, "source": "gpt4" if i % 2 == 0 else "gpt3.5"} for i, r in enumerate(sft)]
    if batch_size % 2 == 0:
        listwise = (ranked_from_pairs(pairs), batch_size // 2)
    else:
        listwise = ([{"prompt": p["prompt"], "completions": [p["chosen"], p["rejected"]], "scores": [1.0, 0.0]}
                     for p in pairs], batch_size)
    rng = random.Random(1)
    return {
        "pairwise": (pairs, batch_size),
        "modpo": ([{**p, "margins": [rng.uniform(-1, 1)]} for p in pairs], batch_size),
        "unpaired": (unpaired_from_pairs(pairs), 2 * batch_size),
        "listwise": listwise,
        "rewarded": (rewarded, 2 * batch_size),
        "crlft": (crlft, 2 * batch_size),
        "sft": (sft, 2 * batch_size),
    }


def as_trained(kind: str, rows: list[dict]) -> list[dict]:
    """The rows as the trainer tokenises them: crlft's prompts carry their class condition
    (`CRLFT_DEFAULTS["prompt_template"]`), which makes its sequences longer than sft's."""
    if kind != "crlft":
        return rows
    from alignkit.training.offline.pointwise import CRLFT_DEFAULTS

    template, conditions = CRLFT_DEFAULTS["prompt_template"], CRLFT_DEFAULTS["conditions"]
    return [{**r, "prompt": template.format(condition=conditions.get(r["source"], r["source"]), prompt=r["prompt"])}
            for r in rows]


def method_run(name: str, kind: str, steps: int) -> tuple[str, str, dict]:
    """(algorithm, data kind, hyper-parameters) of a benchmarked method."""
    if name in VARIANTS:
        algorithm, hparams = VARIANTS[name]
        if name == "tr_dpo":
            hparams = {**hparams, "ref_sync_steps": max(1, steps // 4)}
        return algorithm, "pairwise", hparams
    if name == "modpo":
        return name, "modpo", {"weights": [1.0, 0.5]}
    if name == "treg":  # its token rewards are computed before step 1, like the reference sums
        return name, "pairwise", {"accept_unverified": True}
    if name.startswith("alol"):
        return name, "rewarded", dict(ALOL_OPTIONS)
    return name, data_kind(name, kind), {}


# --------------------------------------------------------------------------- worker


def run_as_worker(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    import torch

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    extra = {}
    if spec["algorithm"].startswith("alol"):
        # A callable passed as alignkit.train(reward=...) reaches only the online loop; a spec
        # string on the config reaches the A-LoL value head.
        from alignkit.training.run.config import TrainConfig

        extra["config"] = TrainConfig(reward="alignkit.testing:planted_reward")
    result = train_alignkit(spec, spec["algorithm"], rows, spec["hparams"], **extra)
    result.update(peak_rss_mib=peak_rss_mib(), method=args.worker, torch_threads=torch.get_num_threads())
    emit_result(result)


# --------------------------------------------------------------------------- parent


def report(results: dict[str, list[dict]], names: list[str], meta: dict, flag: float) -> dict:
    keys = ("step_s", "step_s_median", "steps_per_s", "tokens_per_s", "tokens_per_step", "peak_rss_mib", "final_loss")
    med = {n: {k: median_of(results[n], k) for k in keys} for n in names}
    base = med["dpo"]
    rows, flagged, failures = [], [], {}
    for name in names:
        error = first_error(results[name])
        if error:
            failures[name] = error
            rows.append([name, meta[name]["kind"], "FAILED", *["-"] * 6, error[:60]])
            continue
        m = med[name]
        m["x_dpo_step"] = ratio(m["step_s"], base["step_s"])
        m["x_dpo_step_median"] = ratio(m["step_s_median"], base["step_s_median"])
        m["x_dpo_token"] = ratio(base["tokens_per_s"], m["tokens_per_s"])
        declared = EXTRA_FORWARDS.get(name, "")
        note = declared
        # flag on the mean and the median step (one stall on a shared CPU cannot flag alone) and
        # per real token (crlft's class-conditioned prompts are longer than the same rows' prompts)
        slower = min(m["x_dpo_step"] or 0.0, m["x_dpo_step_median"] or 0.0, m["x_dpo_token"] or 0.0)
        if slower > flag and not declared:
            flagged.append(name)
            note = f"FLAG > {flag}x dpo, no extra forward declared"
        rows.append([name, meta[name]["kind"], m["step_s"] * 1000, m["tokens_per_step"], m["tokens_per_s"],
                     m["x_dpo_step"], m["x_dpo_step_median"], m["x_dpo_token"], m["peak_rss_mib"], note])
    print_table(["method", "data", "step ms", "tok/step", "tokens/s", "x dpo step", "x dpo med step",
                 "x dpo / token", "peak RSS MiB", "extra forwards / note"], rows,
                title="step time relative to dpo (>1 = slower than dpo); medians over rounds")
    print(f"\nflagged (> {flag}x dpo's step time, no extra forward declared): {', '.join(flagged) or 'none'}")
    print("declared extra forwards: " + "; ".join(f"{k}: {v}" for k, v in EXTRA_FORWARDS.items()))
    if failures:
        print("\nfailures:")
        for name, error in failures.items():
            print(f"  {name}: {error}")
    return {"medians": med, "flagged": flagged, "failures": failures}


def main() -> None:
    args = parse_args()
    if args.worker:
        run_as_worker(args)
        return
    os.environ.update(WORKER_ENV)
    from transformers import AutoTokenizer

    from alignkit.testing import build_tiny_model

    kinds = registered()
    names = list(kinds) if args.methods.strip() == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(names) - set(kinds))
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; choose from {sorted(kinds)}")
    names = ["dpo", *[n for n in names if n != "dpo"]]
    workdir = Path(tempfile.mkdtemp(prefix="bench-offline-"))
    model = build_tiny_model(workdir / "model", hidden_size=args.hidden_size, num_layers=args.num_layers,
                             num_heads=args.num_heads, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = long_pairs(args.batch_size * args.steps, seed=args.seed)
    datasets = {}
    for kind, (rows, batch_size) in build_data(pairs, args.batch_size).items():
        path = workdir / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        datasets[kind] = {"data": str(path), "batch_size": batch_size,
                          **count_tokens(as_trained(kind, rows), tokenizer, args.max_length, args.max_prompt_length)}
    base = {"model": str(model), "steps": args.steps, "lr": args.lr, "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length, "lora_r": 0, "seed": args.seed, "threads": args.threads}
    meta = {}
    for name in names:
        algorithm, kind, hparams = method_run(name, kinds[name], args.steps)
        meta[name] = {"algorithm": algorithm, "kind": kind, "hparams": hparams}
    print(f"model: random Llama hidden {args.hidden_size}, {args.num_layers} layers; {args.batch_size} pairs "
          f"(2B sequences) a step, {args.steps} steps, max_length {args.max_length}, threads {args.threads}")
    for kind, d in datasets.items():
        print(f"  {kind:9s} batch {d['batch_size']:3d} rows x {d['sequences_per_example']:.2g} seqs, "
              f"{d['tokens_per_example'] * d['batch_size']:.0f} real tokens a step")

    def run_one(name: str, round_index: int) -> dict:
        m = meta[name]
        out = workdir / f"{name}-{round_index}"
        spec_path = workdir / f"spec-{name}-{round_index}.json"
        spec_path.write_text(json.dumps({**base, **datasets[m["kind"]], "out": str(out), "method": name,
                                         "algorithm": m["algorithm"], "hparams": m["hparams"]}))
        return run_worker(__file__, name, spec_path, timeout=args.timeout,
                          env=child_env(args.threads, out), verbose=args.verbose)

    results = run_rounds(names, args.rounds, run_one, log=lambda s: print(s, flush=True), keep_going=True)
    if first_error(results["dpo"]):
        sys.exit(f"the dpo baseline failed: {first_error(results['dpo'])}")
    summary = report(results, names, meta, args.flag)
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base, "datasets": datasets, "methods": meta,
                                               "runs": results, **summary}, indent=2))
        print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
