"""The offline trainer on 2 torchrun ranks (gloo, CPU, DDP and for a handful FSDP2) equals one
process on the same global batch for every other registered offline algorithm: the pairwise
losses, A-LoL, listwise, C-RLFT, IFT, the reward-model tasks (rm_principles included), T-REG and
filtered_bc (multi-turn BC), plus the DPO options that change the loop (TR-DPO's live reference,
WPO, LD-DPO, loss_weights with an SFT term, gradient accumulation, an eval split evaluated every
step). Rows have unequal lengths, so a rank-local mean would be wrong. The heads fitted on frozen
features by a loop of their own (rm_multi, rm_embedding, rm_vpl) run whole on every rank, rank 0
alone writing the run: they are checked to equal one process by final/'s tensors.
tests/test_distributed_offline.py covers sft, dpo, simpo, kto, rm and rm_ensemble.

`aot` sorts the log-ratios of the rows it sees, i.e. per rank: it is only checked to run on 2
ranks with bit-identical ranks, not to equal one process. Known differences would be strict
xfails with their diagnosis in TRAINING / METRICS below (none today).

One torchrun launch runs all the 2-rank cases (a launch costs 10-15 s here)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from dist_helpers import launch, read_params, relative_error
from run_helpers import read_metrics, write_jsonl

import alignkit
from alignkit.testing import NEGATIVE_WORDS, POSITIVE_WORDS

WORDS = POSITIVE_WORDS + NEGATIVE_WORDS + ["fine", "long", "plain", "odd"]
BASE = {"batch_size": 4, "max_steps": 2, "lr": 1e-2, "warmup_ratio": 0.0}
ALOL = {"reward": "alignkit.testing:planted_reward", "value_max_new_tokens": 4}


def _phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_data(folder: Path) -> dict[str, str]:
    """One JSONL file per data kind, 24 rows each, response lengths varying 1-12 words."""
    rng = random.Random(0)
    n = 24

    def pair() -> dict:
        return {"prompt": f"Review {_phrase(rng, 1, 4)}.", "chosen": " " + _phrase(rng, 1, 12),
                "rejected": " " + _phrase(rng, 1, 12)}

    pairs = [pair() for _ in range(n)]
    margins = [{**pair(), "margins": [round(rng.uniform(-1, 1), 3)]} for _ in range(n)]
    sft = [{"prompt": f"Say {_phrase(rng, 1, 4)}.", "completion": " " + _phrase(rng, 1, 12)} for _ in range(n)]
    sourced = [{**row, "origin": rng.choice(["expert", "crowd"])} for row in sft]
    rewarded = []  # A-LoL: the prompt ends with planted_reward's level digit
    for _ in range(n):
        prompt = f"Review {_phrase(rng, 1, 3)}. Level {rng.randint(0, 4)}"
        rewarded.append({"prompt": prompt, "completion": " " + _phrase(rng, 1, 12)})
    ranked = []
    for i in range(n):
        k = 2 if i % 3 == 2 else 3
        ranked.append({"prompt": f"Review {_phrase(rng, 1, 4)}.",
                       "completions": [" " + _phrase(rng, 1, 12) for _ in range(k)],
                       "scores": [float(s) for s in rng.sample(range(5), k)]})
    safety = []
    for i in range(n):
        both_unsafe = i % 3 == 2
        safety.append({**pair(), "chosen_is_safe": not both_unsafe, "rejected_is_safe": False})
    segments = []
    for _ in range(n):
        sentences, labels = [], []
        for _ in range(rng.randint(1, 3)):
            good = rng.random() < 0.5
            words = " and ".join(rng.choice(POSITIVE_WORDS if good else NEGATIVE_WORDS)
                                 for _ in range(rng.randint(1, 4)))
            sentences.append(f"The film was {words}.")
            labels.append(int(good))
        segments.append({"prompt": "Write a short review.", "completion": " ".join(sentences),
                         "segment_labels": labels})
    ratings = [{**row, "positivity": None if i % 5 == 4 else float(sum(w in POSITIVE_WORDS for w in row["completion"].split())),
                "verbosity": len(row["completion"].split()) / 5.0} for i, row in enumerate(sft)]
    principled = [{**pair(), "principles": [rng.choice(["Prefer short answers.", "Prefer long answers."])]}
                  for _ in range(n)]
    users = [{**pair(), "user": "AB"[i % 2]} for i in range(n)]  # 12 pairs per user
    dialogues = []
    for _ in range(n):
        turns = [{"role": "user", "content": f"Say {_phrase(rng, 1, 4)}."}]
        for _ in range(rng.randint(1, 2)):
            turns += [{"role": "assistant", "content": _phrase(rng, 1, 8)}, {"role": "user", "content": "More."}]
        dialogues.append({"messages": turns[:-1], "reward": round(rng.random(), 3)})
    kinds = {"pairs": pairs, "margins": margins, "sft": sft, "sourced": sourced, "rewarded": rewarded,
             "ranked": ranked, "safety": safety, "segments": segments, "ratings": ratings,
             "principled": principled, "users": users, "dialogues": dialogues}
    return {name: write_jsonl(folder / f"{name}.jsonl", rows) for name, rows in kinds.items()}


def case_name(name: str, strategy: str) -> str:
    return f"{name}-{strategy}"


FSDP2 = {"ipo", "orpo", "listwise_dpo", "rm_bayes", "treg", "ift", "iq_learn", "filtered_bc"}
SPECIAL = {"aot"}  # rank-local sorting: runs on 2 ranks, not equal to one process


def xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


# name: (algorithm, data kind, overrides)
FAMILY: dict[str, tuple[str, str, dict]] = {
    **{name: (name, "pairs", {}) for name in (
        "cdpo", "rdpo", "ipo", "hinge", "sigmoid_norm", "rpo", "exo", "nca", "bco", "sppo_hard", "aot",
        "apo_zero", "apo_down", "cpo", "orpo", "cpl")},
    "discopop": ("discopop", "pairs", {"tau": 0.5}),
    "fdpo": ("fdpo", "pairs", {"divergence": "js"}),  # reverse_kl, the default, is dpo
    "modpo": ("modpo", "margins", {"weights": [1.0, 0.5]}),
    **{name: (name, "rewarded", ALOL) for name in ("alol", "alol_ref_free", "alol_seq", "alol_kl")},
    "listwise_dpo": ("listwise_dpo", "ranked", {"beta": 0.5}),
    "pro": ("pro", "ranked", {}),
    "crlft": ("crlft", "sourced", {"class_column": "origin", "class_rewards": {"expert": 1.0, "crowd": 0.2}}),
    "ift": ("ift", "sft", {}),
    "rm_ranked": ("rm_ranked", "ranked", {}),
    "rm_ranked-all_pairs": ("rm_ranked", "ranked", {"ranked_loss": "all_pairs"}),
    "cost": ("cost", "safety", {}),
    "rm_bayes": ("rm_bayes", "pairs", {"heads": 3, "lambda_": 0.5}),
    "preference_model": ("preference_model", "pairs", {}),
    "rm_segment": ("rm_segment", "segments", {}),
    "treg": ("treg", "pairs", {"accept_unverified": True}),
    "tr_dpo-soft": ("dpo", "pairs", {"ref_sync": "soft", "ref_sync_alpha": 0.5, "ref_sync_steps": 1,
                                     "max_steps": 3}),
    "wpo": ("dpo", "pairs", {"use_weighting": True}),
    "ld_dpo": ("dpo", "pairs", {"ld_alpha": 0.5}),
    "dpo+sft": ("dpo", "pairs", {"loss_weights": {"dpo": 1.0, "sft": 0.5}}),
    "dpo-accum2": ("dpo", "pairs", {"grad_accum": 2}),
    "dpo-eval": ("dpo", "pairs", {"eval_holdout": 8, "eval_steps": 1}),
    "iq_learn": ("iq_learn", "sft", {"lambda_": 0.5, "gamma": 0.9}),
    "rm_seq2seq": ("rm_seq2seq", "pairs", {}),
    "rm_principles": ("rm_principles", "principled", {}),
    "filtered_bc": ("filtered_bc", "dialogues", {"top_fraction": 0.75}),
    "rm_multi": ("rm_multi", "ratings", {"pairs": "data:pairs", "gate_width": 32, "gate_hidden_layers": 1}),
    "rm_embedding": ("rm_embedding", "pairs", {}),
    "rm_vpl": ("rm_vpl", "users", {"context_size": 4, "latent_dim": 8, "hidden_dim": 16}),
}
# Heads fitted on frozen features by a loop of their own (loop.run_replicated): every rank runs
# it whole, rank 0 into the run directory; no model comes back, so final/ is compared instead.
FROZEN_FEATURE_RUNNERS = {"rm_multi", "rm_embedding", "rm_vpl"}
# Cases known not to equal one process, with the diagnosis. TRAINING: the loss, gradient
# norm or parameters differ (or the run fails); METRICS: training matches, a logged metric not.
# None today: rm_bayes draws the noise of the global batch (distributed.pair_rows_of_draw), IFT
# wraps DDP with find_unused_parameters, ratio metrics carry their own weights (Weighted).
TRAINING: dict[str, str] = {}
METRICS: dict[str, str] = {**TRAINING}

CASES = [(name, "ddp") for name in FAMILY] + [(name, "fsdp2") for name in FAMILY if name in FSDP2]


def with_data(overrides: dict, data: dict[str, str]) -> dict:
    """`overrides` with each "data:KIND" value replaced by that kind's file (rm_multi's pairs=)."""
    return {k: data[v[5:]] if isinstance(v, str) and v.startswith("data:") else v for k, v in overrides.items()}


def final_tensors(final: Path) -> dict[str, torch.Tensor]:
    """Every tensor of final/'s safetensors files, keyed FILE/NAME (a runner's backbone, heads, gate)."""
    return {f"{path.name}/{name}": tensor.float() for path in sorted(final.glob("*.safetensors"))
            for name, tensor in read_params(path).items()}


def params_for(cases, known: dict[str, str]):
    out = []
    for name, strategy in cases:
        case = case_name(name, strategy)
        out.append(pytest.param(name, strategy, marks=[xfail(known[case])] if case in known else [], id=case))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Every 2-rank case, trained in one launch; returns (out dir, data files)."""
    tmp = tmp_path_factory.mktemp("two-ranks-family")
    data = write_data(tmp)
    cases = []
    for name, strategy in CASES:
        algorithm, kind, overrides = FAMILY[name]
        cases.append({"name": case_name(name, strategy), "algorithm": algorithm, "model": str(tiny_model_dir),
                      "data": data[kind], "overrides": {**BASE, **with_data(overrides, data), "strategy": strategy}})
    out = tmp / "out"
    launch({"cases": cases, "out": str(out)}, tmp)
    return out, data


_single: dict[str, tuple] = {}


def one_process(name: str, model_dir, data: dict[str, str], root: Path):
    """The same run in this process (cached: the training and metrics tests, ddp and fsdp2 share it)."""
    if name not in _single:
        algorithm, kind, overrides = FAMILY[name]
        out = root / f"single-{name}"
        result = alignkit.train(algorithm, model=str(model_dir), data=data[kind], output_dir=out, progress=False,
                                **{**BASE, **with_data(overrides, data)})
        if result.model is None:
            params = final_tensors(out / "final")
        else:
            params = {n: p.detach().float().clone() for n, p in result.model.named_parameters()}
        _single[name] = (read_metrics(out), params)
    return _single[name]


def two_ranks(out: Path, case: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The 2-rank run's metrics and rank 0's final parameters, after checking that it finished
    and that rank 1's parameters are bit-identical."""
    folder = out / case
    if not (folder / "final-rank1.txt").exists():
        errors = [line for line in (out / "stderr.txt").read_text().splitlines() if "Error" in line]
        pytest.fail(f"{case} did not finish on 2 ranks:\n" + "\n".join(errors[-6:]))
    if not (folder / "params-rank1.safetensors").exists():  # a frozen-feature runner: rank 0's final/
        for rank in (0, 1):
            assert (folder / f"final-rank{rank}.txt").read_text() == str(folder / "run" / "final")
        return read_metrics(folder / "run"), final_tensors(folder / "run" / "final")
    rank0, rank1 = read_params(folder / "params-rank0.safetensors"), read_params(folder / "params-rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "ranks diverged"
    return read_metrics(folder / "run"), rank0


def steps_of(name: str) -> int:
    return FAMILY[name][2].get("max_steps", BASE["max_steps"])


def assert_params_match(two: dict[str, torch.Tensor], one: dict[str, torch.Tensor], steps: int) -> None:
    """Every element to 1e-4, but for a few (at most 1 in 4,000) within the 2 lr per step that
    separate two AdamW runs whose gradient for that element is ~0 and so has a noise-decided sign
    (measured: 1-3 of 41,120 elements beyond 1e-4, as far apart as one process is from itself with
    another logp_chunk_size)."""
    assert two.keys() == one.keys()
    outliers, total = {}, sum(p.numel() for p in one.values())
    for name in one:
        diff = (two[name] - one[name]).abs()
        assert float(diff.max()) <= 2 * BASE["lr"] * steps, (name, float(diff.max()))
        if (count := int((diff > 1e-4).sum())) > 0:
            outliers[name] = (count, float(diff.max()))
    assert sum(count for count, _ in outliers.values()) <= max(1, total // 4000), outliers


@pytest.mark.parametrize(("name", "strategy"), params_for([c for c in CASES if c[0] not in SPECIAL], TRAINING))
def test_two_ranks_train_as_one_process(runs, tiny_model_dir, name, strategy):
    """Per step loss and grad norm (and eval/loss where logged) to 1e-5 relative, and the final
    parameters; both ranks' parameters bit-identical."""
    out, data = runs
    two, rank0 = two_ranks(out, case_name(name, strategy))
    one, one_params = one_process(name, tiny_model_dir, data, out.parent)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    two, one = ([r for r in rows if r["step"] > 0] for rows in (two, one))  # (rm_multi's step 0: its ridge fit)
    assert [r["step"] for r in two] == list(range(1, steps_of(name) + 1))
    for a, b in zip(two, one, strict=True):
        assert ("eval/loss" in a) == ("eval/loss" in b), a["step"]
        for key in ("loss", "grad_norm", "eval/loss"):
            if key in b:
                assert relative_error(a[key], b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    if FAMILY[name][2].get("eval_steps"):
        assert all("eval/loss" in r for r in two)
    assert_params_match(rank0, one_params, steps_of(name))
    run, single = out / case_name(name, strategy) / "run", out.parent / f"single-{name}"
    for folder in (".", "final"):  # rank 0 alone wrote the run directory, as one process does
        assert sorted(p.name for p in (run / folder).iterdir()) == sorted(p.name for p in (single / folder).iterdir())


@pytest.mark.parametrize(("name", "strategy"), params_for([c for c in CASES if c[0] not in SPECIAL], METRICS))
def test_two_ranks_log_the_metrics_of_one_process(runs, tiny_model_dir, name, strategy):
    """Every other metric one process logs (rewards, log-probs, accuracies, NLLs, weights, ...):
    at step 1, on the initial parameters, to 1e-5 (relative and absolute); later, where the
    parameters' own noise (above) has moved them by up to ~1e-4, to 1e-3 relative + 1e-4. An
    accuracy is not compared where every margin is exactly 0 (step 1 with policy = reference:
    a 1e-7 difference decides it)."""
    out, data = runs
    two, _ = two_ranks(out, case_name(name, strategy))
    one, _ = one_process(name, tiny_model_dir, data, out.parent)
    for a, b in zip(two, one, strict=True):
        assert a.keys() == b.keys(), (a["step"], a.keys() ^ b.keys())
        first = a["step"] == 1
        for key, value in b.items():
            if key.startswith("throughput/") or key in ("step", "lr") or not isinstance(value, int | float):
                continue
            if key.endswith("accuracies") and b.get(key.replace("accuracies", "margins")) == 0.0:
                continue
            tight = first and not key.startswith("eval/")  # eval runs after the step's update
            rel, absolute = (1e-5, 1e-5) if tight else (1e-3, 1e-4)
            expected = pytest.approx(value, rel=rel, abs=absolute, nan_ok=True)  # rm_multi's step 0: loss NaN
            assert a[key] == expected, (a["step"], key, a[key], value)


@pytest.mark.parametrize(("name", "strategy"), params_for([c for c in CASES if c[0] in SPECIAL], {}))
def test_rank_local_losses_run_on_two_ranks(runs, name, strategy):
    """AOT sorts each rank's own rows: not one process's loss, but it trains and the ranks agree."""
    out, _ = runs
    metrics, _ = two_ranks(out, case_name(name, strategy))
    assert [r["step"] for r in metrics] == list(range(1, steps_of(name) + 1))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in metrics)
