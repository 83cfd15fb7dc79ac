"""The online loop on 2 torchrun ranks (gloo, CPU, DDP) equals one process: each rank samples
a contiguous block of whole prompt groups with the noise keyed on the global sample index, every
rank holds the gathered global batch for scoring, KL and advantages, step 3's log-probs are split
by rows and gathered, and step 6 splits each minibatch with losses normalised by its global
token/sequence counts. Checked for grpo, ppo (separate critic), dapo (dynamic sampling rounds),
rloo and grpo with LoRA, online_dpo, remax and reinforce_pp with micro-batches, raft,
superhf with micro-batches, pf_ppo, safe_ppo, distill (reverse_kl and jsd), inpo, nash_md, dpa, ma_ppo
(random macro actions), ppo on dense (per-token) rewards from a function (replicated) and from an
rm_segment model (each rank scores its rows, dense rows gathered), drpo (each rank rolls in its
rows' prefixes), salsa (a soup reference), dr_grpo with micro-batches, expert_iteration (a step
keeping one sample, one keeping none: skipped on both ranks), cgpo_crpg and cgpo_crraft (the judges
label the gathered batch: global violation rates; with a reward model, an LLM judge), grpo sampling
through one rollout server shared by both ranks (--rollout vllm --vllm-url, the reference
server; also with LoRA, a KL term and FSDP2), and under
FSDP2 grpo, ppo, grpo with LoRA and a KL term, dapo with micro-batches, and multi-turn grpo and
ppo (--env: each round of turns split across the ranks, every rank replaying the environment;
an environment that answers differently per rank is refused) and refuel with the policy as
the simulated user (sampled on each rank's own engine): sampled
completions identical (reward/mean and response_length equal exactly at every step), grad norms
to 1e-5 relative, losses to 1e-5 relative + 1e-7 absolute (policy-gradient losses are sums that
cancel to ~1e-8), final weights to 1e-4, the ranks bit-identical. Plus an interrupted 2-rank
run resumed, and a 2-rank checkpoint resumed in one process. One torchrun launch."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from dist_helpers import assert_runs_match, free_port, launch, read_params
from run_helpers import read_metrics, write_jsonl
from test_online_salsa import noisy_copy

import alignkit
from alignkit.testing import build_tiny_model

PROMPTS = ["Write a short review.", "The movie", "Tell me", "What is two plus two?", "Say something nice",
           "A story about"]
# padded batches: each rank's rows then round as in one process, to ~1e-6 (padding-free packing
# depends on which rows share a pack; the *-packed cases check it under 2 ranks)
BASE = {"padding_free": False, "batch_size": 4, "max_steps": 3, "lr": 1e-2, "warmup_ratio": 0.0,
        "scheduler": "constant", "max_new_tokens": 8, "group_size": 4, "reward": "dist_helpers:count_e"}
RM = "<reward model>"  # stands for the reward model the fixture builds
SEGMENT_RM = "<segment reward model>"  # stands for the rm_segment model the fixture trains
SERVER = "<rollout server>"  # stands for the URL of the reference server the fixture starts
SOUP = "<two checkpoints>"  # the tiny model and a noisy copy, comma-separated (salsa's --ref-model)
RESET_DATA = "<prompts with offline responses>"  # the prompts with an e-rich `chosen` column (drpo)
_server_url: list[str] = []
TEACHER = "<teacher>"  # stands for a second tiny model (another seed) the fixture builds
_teacher_dir: list[str] = []
_segment_model: list[str] = []
_resources: dict[str, str] = {}
LLM_JUDGES = "<regex and LLM judges>"  # regex:e and the tiny model as a judge (P(Yes) ~ 0.484-0.491 here)
MULTI_TURN = {"env": "dist_helpers:TwoTurns", "max_turns": 2, "max_episode_tokens": 64}
CASES = {
    "grpo": ("grpo", {}),
    "ppo": ("ppo", {}),
    "dapo": ("dapo", {}),
    "rloo-lora": ("rloo", {"lora_r": 4}),
    "grpo-lora-kl": ("grpo", {"lora_r": 4, "beta": 0.05}),
    "online_dpo": ("online_dpo", {}),
    "remax": ("remax", {}),
    "reinforce_pp-micro3": ("reinforce_pp", {"micro_batch_size": 3}),
    # filtered samples: SFT on each group's best (superhf: + the full-vocabulary KL prior, the
    # reference's distributions split by rows), PPO on best + random
    "raft": ("raft", {}),
    "superhf-micro3": ("superhf", {"micro_batch_size": 3}),
    "pf_ppo": ("pf_ppo", {}),
    # safe_ppo: the cost scored on every rank, both critics' values split by rows
    # distill: the teacher's log-probs split by rows (reverse_kl) and its distributions (jsd)
    "distill": ("distill", {"teacher": TEACHER}),
    "inpo": ("inpo", {"inpo_eta": 0.1}),
    # dpa: prompts tokenised per step under drawn directions (every rank draws the same)
    "dpa": ("dpa", {"reward": "dist_helpers:e_and_o", "dpa_attributes": "e,o"}),
    # nash_md: every rank samples the same mixture opponents (replicated), judged by count_e
    "nash_md": ("nash_md", {"beta": 0.02}),
    "distill-jsd": ("distill", {"teacher": TEACHER, "distill_loss": "jsd"}),
    "safe_ppo": ("safe_ppo", {"cost": "dist_helpers:e_excess", "cost_limit": 0.0, "lambda_lr": 0.5}),
    # ma_ppo: random macro actions drawn from the same (seed, step) stream on every rank, over the
    # gathered global batch
    "ma_ppo-random": ("ma_ppo", {"macro_termination": "random", "macro_repeat": 1}),
    # drpo: the reset draws are global (replicated), each rank forces its block's prefixes. Its
    # whitened rewards (replicated maths) make Adam's weights ~10x more sensitive to float noise
    # (one process, logprob_micro_batch_size 0 vs 2: 2e-5 apart, ppo 2e-6; 2 ranks: 1.4e-4), so
    # the case leaves them off to keep the 1e-4 weight check
    "drpo": ("drpo", {"data": RESET_DATA, "reset_prob": 0.5, "whiten_rewards": False}),
    # salsa: every rank builds the same soup; the reference's rows split by rank
    "salsa": ("salsa", {"ref_model": SOUP}),
    # a reward model scores each rank's rows (gathered) and initialises the critic
    "ppo-reward-model": ("ppo", {"reward": None, "reward_model": RM, "critic_init": RM}),
    # dense rewards: a function's per-token rewards on every rank; an rm_segment model's per-segment
    # rewards scored on each rank's rows and gathered as (N, L) rows
    "ppo-dense": ("ppo", {"reward": "dist_helpers:even_tokens"}),
    "ppo-segment-model": ("ppo", {"reward": None, "reward_model": SEGMENT_RM}),
    # one rollout server for both ranks (--vllm-url): each rank sends its prompt groups, rank 0
    # syncs the weights, old log-probs recomputed by the trainer
    "grpo-server-rollout": ("grpo", {"rollout": "vllm", "vllm_url": SERVER}),
    "grpo-lora-server-rollout-fsdp2": ("grpo", {"rollout": "vllm", "vllm_url": SERVER, "strategy": "fsdp2",
                                                "lora_r": 4, "beta": 0.05}),
    # ... sent the adapter alone (gathered from the FSDP2 shards), every rank naming its version
    "grpo-lora-adapter-sync-fsdp2": ("grpo", {"rollout": "vllm", "vllm_url": SERVER, "strategy": "fsdp2",
                                              "lora_r": 4, "beta": 0.05, "vllm_lora_sync": "adapter"}),
    # FSDP2: the engine samples an unsharded copy refreshed after every update; no-grad passes
    # run in lockstep; LoRA's reference is the sharded policy with the adapter off
    "grpo-fsdp2": ("grpo", {"strategy": "fsdp2"}),
    "ppo-fsdp2": ("ppo", {"strategy": "fsdp2"}),
    "grpo-lora-kl-fsdp2": ("grpo", {"strategy": "fsdp2", "lora_r": 4, "beta": 0.05}),
    "dapo-micro3-fsdp2": ("dapo", {"strategy": "fsdp2", "micro_batch_size": 3}),
    # multi-turn (--env): each round of turns is split across the ranks by the engine wrapper and
    # gathered; every rank replays every conversation's environment steps (deterministic env)
    "grpo-multiturn": ("grpo", MULTI_TURN),
    "ppo-multiturn": ("ppo", MULTI_TURN),
    # refuel: reset turns and branches replicated; the simulated user (the policy) samples on each
    # rank's own engine: its calls come from the environment threads, in any order
    "refuel-user-policy": ("refuel", {"user_model": "policy", "group_size": 2, "max_turns": 2,
                                      "max_episode_tokens": 64}),
    # dr_grpo: constant_norm divides by the minibatch's global sequence count x max_new_tokens, also
    # across micro-batches and the weight-0 stand-ins of a rank with fewer rows
    "dr_grpo-micro3": ("dr_grpo", {"micro_batch_size": 3}),
    # expert_iteration: the filter runs on the gathered batch, so the kept count is global. count_e >= 2
    # keeps 1, 1, 0 of 16 samples: one rank trains the kept row while the other holds only a
    # weight-0 stand-in, and a step that keeps nothing skips its update on every rank
    # (test_expert_iteration_keeps_and_skips_as_one_process); >= 1 with micro-batches of 2 keeps
    # 3, 2, 5 (unequal rows per rank)
    "expert_iteration": ("expert_iteration", {"filter_min_reward": 2.0}),
    "expert_iteration-micro2": ("expert_iteration", {"filter_min_reward": 1.0, "micro_batch_size": 2}),
    # (FSDP2: the rank without a kept row still runs the stand-in's forward, every forward a collective)
    "expert_iteration-fsdp2": ("expert_iteration", {"filter_min_reward": 2.0, "strategy": "fsdp2"}),
    # cgpo: the judges label the gathered batch on every rank, so violation rates are global; CRPG with
    # the KL factor (the reference's rows split), with a reward model scoring each rank's rows inside
    # the constrained reward, and CRRAFT with an LLM judge (the tiny model) labelling each rank's rows
    "cgpo_crpg": ("cgpo_crpg", {"judges": "regex:e|max_chars:50", "cgpo_kl_threshold": 50.0}),
    "cgpo_crpg-reward-model": ("cgpo_crpg", {"reward": None, "reward_model": RM, "judges": "regex:e|max_chars:50"}),
    "cgpo_crraft-llm-judge": ("cgpo_crraft", {"judges": LLM_JUDGES}),
}
PACKED = {  # padding-free (the default): each rank packs its own rows
    "grpo-packed": ("grpo", {"padding_free": True, "beta": 0.05}),
    "grpo-fsdp2-packed": ("grpo", {"padding_free": True, "beta": 0.05, "strategy": "fsdp2"}),
}
RESUME = {"max_steps": 4, "save_steps": 1}


def build_reward_model(folder: Path, model_dir) -> str:
    """A sequence-classification reward model on the tiny model's backbone (random head, seeded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return str(folder)


def build_teacher(folder: Path) -> str:
    """A tiny model of another seed with its output head scaled x30: peaked next-token
    distributions, far from the near-uniform policy's (so distillation's gradients are not
    float noise that Adam would amplify)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_model(folder, seed=1)
    teacher = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(30.0)
    teacher.save_pretrained(folder)
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    return str(folder)


def build_segment_model(folder: Path, model_dir) -> str:
    """A tiny rm_segment model (one epoch on 32 synthetic rows): its final/ directory."""
    from reward_helpers import train_tiny

    from alignkit.testing import synthetic_segments

    return str(train_tiny("rm_segment", synthetic_segments(32, seed=6), folder, model_dir=model_dir, epochs=1,
                          lr=2e-3).final_dir)


def resolved(extra: dict, reward_model: str) -> dict:
    placeholders = {RM: reward_model, SEGMENT_RM: _segment_model[0] if _segment_model else None,
                    SERVER: _server_url[0] if _server_url else None, TEACHER: _teacher_dir[0] if _teacher_dir else None,
                    **_resources}
    return {k: placeholders.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    from alignkit.models import load_model
    from alignkit.rollout.reference_server import ReferenceServer

    served, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    with ReferenceServer(served, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,),
                         max_lora_rank=16) as server:
        _server_url[:] = [server.url]
        yield from _launched_runs(tmp_path_factory, tiny_model_dir)
        _server_url.clear()


def _launched_runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("two-ranks-online")
    data = write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 3])
    reward_model = build_reward_model(tmp / "rm", tiny_model_dir)
    _teacher_dir[:] = [build_teacher(tmp / "teacher")]
    _segment_model[:] = [build_segment_model(tmp / "segment-rm", tiny_model_dir)]
    _resources[RESET_DATA] = write_jsonl(tmp / "reset.jsonl", [{"prompt": p, "chosen": "e e e e e e e e"}
                                                               for p in PROMPTS * 3])
    _resources[SOUP] = f"{tiny_model_dir},{noisy_copy(tiny_model_dir, tmp / 'sibling')}"
    _resources[LLM_JUDGES] = f"regex:e|judge:{tiny_model_dir},threshold=0.4875"
    cases = [{"name": name, "algorithm": algorithm, "model": str(tiny_model_dir), "data": data,
              "overrides": {**BASE, **resolved(extra, reward_model)}}
             for name, (algorithm, extra) in {**CASES, **PACKED}.items()]
    for case in cases:
        case["data"] = case["overrides"].pop("data", data)
    for case, (_, extra) in zip(cases, {**CASES, **PACKED}.values(), strict=False):
        if extra.get("vllm_url") == SERVER:  # the ranks run in their own network namespace: rank 0
            port = free_port()               # serves the rollout there, on this port
            case["serve_rollout"] = port
            case["overrides"]["vllm_url"] = f"http://127.0.0.1:{port}"
    cases.append({"name": "multiturn-rank-dependent-env", "algorithm": "grpo", "model": str(tiny_model_dir),
                  "data": data, "overrides": {**BASE, **MULTI_TURN, "env": "dist_helpers:RankDependent"},
                  "expect_error": True})
    cases.append({"name": "ppo-resumed", "algorithm": "ppo", "model": str(tiny_model_dir), "data": data,
                  "overrides": {**BASE, **RESUME}, "interrupt_at": 2})
    cases.append({"name": "grpo-fsdp2-resumed", "algorithm": "grpo", "model": str(tiny_model_dir), "data": data,
                  "overrides": {**BASE, **RESUME, "strategy": "fsdp2"}, "interrupt_at": 2})
    launch({"cases": cases, "out": str(tmp / "out")}, tmp)
    yield tmp / "out", data, reward_model


_single: dict[tuple, tuple] = {}


def one_process(algorithm: str, model_dir, data: str, root: Path, **overrides):
    overrides = {k: v for k, v in overrides.items() if k != "strategy"}  # one process: no strategy
    key = (algorithm, data, tuple(sorted(overrides.items())))
    if key not in _single:
        out = root / f"single-{len(_single)}"
        result = alignkit.train(algorithm, model=str(model_dir), data=data, output_dir=out, progress=False,
                                **{**BASE, **overrides})
        _single[key] = (read_metrics(out), {n: p.detach().float().clone() for n, p in result.model.named_parameters()})
    return _single[key]


@pytest.mark.parametrize("name", list(PACKED))
def test_two_ranks_packed_equal_one_process_to_rounding(runs, tiny_model_dir, name):
    """Padding-free under 2 ranks: the same samples, losses and gradients as one process up to
    the rounding of packing other rows together (Adam turns float noise on near-zero gradients
    into visible weight differences after a few steps at lr 1e-2, so weights are compared
    between the ranks, which must hold identical ones)."""
    out, data, _ = runs
    algorithm, extra = PACKED[name]
    one_metrics, _ = one_process(algorithm, tiny_model_dir, data, out.parent, **extra)
    assert_runs_match(read_metrics(out / name / "run"), one_metrics, rel=3e-4)
    rank0, rank1 = (read_params(out / name / f"params-rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "ranks diverged"


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(runs, tiny_model_dir, name):
    out, data, reward_model = runs
    algorithm, extra = CASES[name]
    extra = resolved(extra, reward_model)
    one_metrics, one_params = one_process(algorithm, tiny_model_dir, extra.pop("data", data), out.parent, **extra)
    assert_runs_match(read_metrics(out / name / "run"), one_metrics, 1e-6 if "reward_model" in extra else 0.0)
    rank0, rank1 = (read_params(out / name / f"params-rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "ranks diverged"
    for n, value in one_params.items():
        if name in ADAM_NOISE_CASES:  # losses and grad norms matched above; see ADAM_NOISE_CASES
            gap = (rank0[n] - value).abs()
            assert (gap > 1e-4).float().mean() <= 0.01 and gap.max() <= 1e-2, (n, gap.max().item())
        else:
            torch.testing.assert_close(rank0[n], value, rtol=0, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


ADAM_NOISE_CASES = {"nash_md", "dr_grpo-micro3"}
"""Runs whose final parameters may differ beyond 1e-4 in a few embedding rows: Adam moves a
parameter by ~lr whatever the size of its gradient, so a row whose gradient is float noise
(a token the batch barely touches) takes steps whose sign follows that noise. Measured on the
2026-12-07 environment: 42 of 10240 embedding entries (one row and a bit) up to 3.5e-3 apart,
every loss, KL and grad norm within tolerance; on 2026-12-04 the parameters matched to 1e-4.
dr_grpo (unscaled advantages, so small gradients): 2 of 10240 embedding entries 5.7e-4..7.1e-4
apart, in rows 114 and 255 whose first gradient comes at step 3 with those entries at -2.0e-8
and -1.0e-8, the size of Adam's eps (1e-8): its first step lr g / (|g| + eps) turns their
~1e-9 rounding difference into ~0.07 lr. Every loss and grad norm within 1.1e-6 relative."""


def test_every_online_preset_has_a_two_rank_case():
    """Issue 10: `torchrun ... train ALGO` for every registered online algorithm, so each has a case."""
    from alignkit.training.run.registry import ALGORITHMS

    online = {name for name, spec in ALGORITHMS.items() if spec.runner == "online"}
    assert online - {algorithm for algorithm, _ in CASES.values()} == set()


def test_expert_iteration_keeps_and_skips_as_one_process(runs, tiny_model_dir):
    """The filter sees the gathered batch: a step keeping one sample (trained on one rank, a
    weight-0 stand-in on the other) and a step keeping none (its update skipped on both ranks,
    no collective left waiting), with the kept counts of one process."""
    out, data, _ = runs
    rows = read_metrics(out / "expert_iteration" / "run")
    one, _ = one_process("expert_iteration", tiny_model_dir, data, out.parent, **CASES["expert_iteration"][1])
    kept = [r["filter/kept_samples"] for r in rows]
    assert kept == [r["filter/kept_samples"] for r in one]
    assert 1.0 in kept and 0.0 in kept, kept
    for row in rows:
        if row["filter/kept_samples"] == 0.0:
            assert "grad_norm" not in row and row["loss"] == 0.0, row
        else:
            assert row["grad_norm"] > 0.0, row


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("cgpo")])
def test_cgpo_judge_rates_are_the_global_batch_rates(runs, tiny_model_dir, name):
    """judges/<name>/violation_rate, judges/feasible_rate and judges/reward of 2 ranks are those
    of one process (the judges label all 16 samples on every rank, not a rank's 8), and each
    judge accepts some samples and rejects others on some step (the verdicts carry information)."""
    out, data, reward_model = runs
    algorithm, extra = CASES[name]
    two = read_metrics(out / name / "run")
    one, _ = one_process(algorithm, tiny_model_dir, data, out.parent, **resolved(extra, reward_model))
    tolerance = 1e-6 if "reward_model" in extra else 0.0  # the reward model's rows in batches of another shape
    for a, b in zip(two, one, strict=True):
        judged = {key for key in b if key.startswith("judges/")}
        assert judged == {key for key in a if key.startswith("judges/")} and len(judged) >= 3
        for key in judged:
            allowed = tolerance if key == "judges/reward" else 0.0
            assert a[key] == pytest.approx(b[key], rel=allowed, abs=allowed), (a["step"], key, a[key], b[key])
    for key in (k for k in two[0] if k.endswith("/violation_rate") and "max_chars" not in k):
        assert any(0.0 < r[key] < 1.0 for r in two), (key, [r[key] for r in two])


def test_ppo_critic_trains_on_both_ranks(runs):
    out = runs[0]
    rows = read_metrics(out / "ppo" / "run")
    assert all("value_loss" in r for r in rows)


@pytest.mark.parametrize(("name", "algorithm"), [("ppo-resumed", "ppo"), ("grpo-fsdp2-resumed", "grpo")])
def test_interrupted_two_rank_run_resumes_to_the_same_metrics(runs, tiny_model_dir, name, algorithm):
    out, data, _ = runs
    one_metrics, _ = one_process(algorithm, tiny_model_dir, data, out.parent, **RESUME)
    assert_runs_match(read_metrics(out / name / "run"), one_metrics)


def test_two_rank_checkpoint_resumes_in_one_process(runs, tiny_model_dir, tmp_path):
    out, data, _ = runs
    run = tmp_path / "run"
    shutil.copytree(out / "ppo-resumed" / "run", run)
    shutil.rmtree(run / "final")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    alignkit.train("ppo", model=str(tiny_model_dir), data=data, output_dir=tmp_path / "unused", resume=str(run),
                   progress=False, **{**BASE, **RESUME})
    assert_runs_match(read_metrics(run), read_metrics(out / "ppo-resumed" / "run"))


def test_multi_turn_episodes_log_their_metrics_on_two_ranks(runs):
    out = runs[0]
    for name in ("grpo-multiturn", "ppo-multiturn", "refuel-user-policy"):
        rows = read_metrics(out / name / "run")
        assert all(r["turns/mean"] >= 1.0 and "episode/return" in r for r in rows), name
        assert rows[0]["episode/length"] > rows[0]["episode/policy_tokens"], name  # the other side's tokens
    assert "env/first_e" in read_metrics(out / "grpo-multiturn" / "run")[0]
    assert "env/user_tokens" in read_metrics(out / "refuel-user-policy" / "run")[0]


def test_an_environment_that_differs_between_ranks_is_refused(runs):
    out = runs[0]
    for rank in (0, 1):
        message = (out / "multiturn-rank-dependent-env" / f"error-rank{rank}.txt").read_text()
        assert "dist_helpers:RankDependent gave different episodes on different torchrun ranks" in message


def test_gathered_rollouts_keep_the_environment_mask():
    """`gather_rollout` (one process: the identity gathers) carries env_mask like rollin_mask."""
    from alignkit.rollout import Rollout
    from alignkit.training.online.distributed_rollout import gather_rollout
    from alignkit.training.run.distributed import Ranks

    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    env = torch.tensor([[False, True, False, False], [False, False, False, False]])
    local = Rollout([[1], [1]], torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]), torch.full((2, 4), -0.5), mask,
                    ["stop", "length"], torch.tensor([0, 0]), env_mask=env)
    out = gather_rollout(local, [[1]], 2, Ranks(), pad_id=0)
    assert torch.equal(out.env_mask, env[:, :3]) and torch.equal(out.response_ids, local.response_ids[:, :3])
    assert out.finish_reason == ["stop", "length"] and out.rollin_mask is None
    plain = gather_rollout(dataclasses.replace(local, env_mask=None), [[1]], 2, Ranks(), pad_id=0)
    assert plain.env_mask is None
