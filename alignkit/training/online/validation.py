"""Validation while training an online preset: `--eval-data FILE --eval-steps N`.

Before step 1 (the curves' starting point, step 0), every N steps and at the last
step, the driver samples every held-out prompt `--eval-samples K` times from the rollout
engine with the training sampling settings (max_new_tokens, temperature, top_p, top_k),
scores the samples and logs, at that step:

  eval/reward   mean training reward of the samples, raw (no missing-EOS penalty, no reward
                normalisation); several --reward: sum_k w_k r_k of the raw rewards; dense
                (per-token) rewards: each sample's sum
  eval/gold     mean --gold-reward (when given), built like --reward: a second, "true"
                reward beside the trained one shows over-optimisation (Gao et al. 2022)
  eval/pass@k   for each k of --eval-k, the unbiased estimator of Chen et al. 2021 averaged
                over prompts: E_prompts[1 - C(n - c, k) / C(n, k)], n = K samples, c of them
                correct; correct = gold reward (else training reward) >= --eval-pass-threshold
  eval/kl       with a reference: mean over samples of the summed per-token k1 estimate
                log pi(y_t) - log pi_ref(y_t), the policy at temperature 1 (omitted without)
  eval/length   mean response tokens
  time/eval_s   seconds the validation took

Validation changes nothing the training computes: the engine's noise is keyed on (seed,
sample index, step) (`rollout/sampling.py`) and validation passes its own seed
`eval_seed(seed, step)`, never one of the training rounds' `step_seed`; the global torch,
Python and numpy generators are restored afterwards (a reward function may draw from them);
the running reward statistics, the KL controller, the prompt cursor and the several-reward
log are not touched. A run with --eval-data trains exactly as one without, resumed or not.

Under torchrun every rank validates at the same steps on the same prompts, through the same
roles as training: the engine splits the prompt groups across ranks (`ShardedRollout`), the
log-probs split rows, the rewards score as in training; the metrics are equal on every rank
and rank 0 writes them.

Rows: eval/* join that step's row, and an eval step between logging steps is logged as well
(every metrics row holds `step` and `loss`, DESIGN.md); the validation before step 1 goes into
the first row as eval_start/* (`loop.initial_validation`), drawn at step 0 by
`alignkit.eval.report.validation_points`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from alignkit.agents.reward_specs import load_reward  # rewards.load_reward + rlhs:CONFIG.yaml
from alignkit.eval.stats import mean_pass_at_k
from alignkit.objectives import KL
from alignkit.rewards.dense import sequence_scores
from alignkit.rewards.runner import reward_batch
from alignkit.rollout import SamplingParams
from alignkit.training.online.distributed_rollout import check_episodes_agree
from alignkit.training.online.multi_reward import MultiReward
from alignkit.training.online.roles import (
    FunctionReward,
    RewardRole,
    SequenceBatch,
    decode_completions,
)
from alignkit.training.online.sampling import CONVERSATION_COLUMN
from alignkit.training.online.settings import OnlineSettings
from alignkit.training.run import distributed
from alignkit.training.run.config import TrainConfig

EVAL_OPTIONS = {"gold_reward": None, "eval_samples": 1, "eval_k": "1", "eval_pass_threshold": 1.0}
"""The validation options besides --eval-data / --eval-steps, with their defaults."""


def parse_eval_k(text: str) -> list[int]:
    """`--eval-k 1,4` -> [1, 4] (sorted, unique); each k >= 1. Errors name the flag."""
    try:
        ks = sorted({int(part) for part in str(text).split(",")})
    except ValueError:
        raise ValueError(f"--eval-k {text}: expected comma-separated whole numbers, e.g. 1,4") from None
    if ks[0] < 1:
        raise ValueError(f"--eval-k {text}: each k must be >= 1")
    return ks


def check_eval_options(config: TrainConfig) -> None:
    """The validation flags of an online run, checked before anything loads (one line each)."""
    if config.eval_steps and not config.eval_data:
        raise ValueError(f"--eval-steps {config.eval_steps} needs --eval-data FILE (the held-out prompts)")
    if config.eval_data and not config.eval_steps:
        raise ValueError("--eval-data needs --eval-steps N (validate at step 0, every N steps and at the last step)")
    if not config.eval_data:
        for name, default in EVAL_OPTIONS.items():
            if getattr(config, name) != default:
                raise ValueError(f"--{name.replace('_', '-')} applies to validation: add --eval-data FILE "
                                 "and --eval-steps N")
    ks = parse_eval_k(config.eval_k)
    if ks[-1] > config.eval_samples:
        raise ValueError(f"--eval-k {config.eval_k}: pass@{ks[-1]} needs --eval-samples >= {ks[-1]} "
                         f"(got {config.eval_samples})")
    if not math.isfinite(config.eval_pass_threshold):
        raise ValueError(f"--eval-pass-threshold must be finite, got {config.eval_pass_threshold}")


def eval_seed(seed: int, step: int) -> int:
    """Engine seed of the validation at `step`: a function of (seed, step) only, hashed so that
    it is none of the training rounds' `step_seed(seed, step, round)` (an affine map)."""
    digest = hashlib.sha256(f"alignkit-validation:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**62


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the global torch (CPU and `device`), Python and numpy generators on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def reshard(engine: torch.nn.Module) -> None:
    """Free FSDP2's unsharded parameters after no-grad forwards that no backward follows: the
    root module keeps its parameters unsharded after a forward (for the backward it expects),
    and a checkpoint or final/ written then would meet them instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in engine.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def raw_scores(scorer: RewardRole, batch, prompts, completions, columns) -> torch.Tensor:
    """(N,) raw reward of each sample. Several rewards: sum_k w_k r_k, each reward scored by
    its own role (the combined role's group normalisation needs the training group size, and
    its log of per-reward scores belongs to the training step)."""
    if isinstance(scorer, MultiReward):
        per_reward = torch.stack([sequence_scores(role.score(batch, prompts, completions, columns)[0]).float()
                                  .reshape(-1).cpu() for role in scorer.roles])  # (K, N)
        scores = (scorer.weights.unsqueeze(-1) * per_reward).sum(0)
    else:
        scores = sequence_scores(scorer.score(batch, prompts, completions, columns)[0]).float().reshape(-1).cpu()
    drain = getattr(scorer, "drain", None)
    if drain is not None:
        drain()  # what a reward logs beside its score (rlhs/...) belongs to training samples, not held-out ones
    return scores


def load_gold_reward(config: TrainConfig, s: OnlineSettings, gold: Any = None) -> RewardRole | None:
    """The --gold-reward role (`gold`, a callable or spec given in Python, first): a reward
    function with the training reward's error policy, deadline and scoring threads."""
    spec = gold if gold is not None else config.gold_reward
    if spec is None:
        return None
    fn = load_reward(spec) if isinstance(spec, str) else spec
    return FunctionReward(fn, on_error=s.reward_on_error, timeout=config.reward_timeout,
                          workers=config.reward_workers)


class NoValidation:
    """A run without --eval-data: never due."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return False


class Validation:
    """Samples and scores the held-out prompts at step 0, every `eval_steps` and the last step."""

    def __init__(self, config: TrainConfig, s: OnlineSettings, roles, prompts: tuple[list, list, list],
                 gold: RewardRole | None, *, total_steps: int, exact_engine: bool) -> None:
        self.config, self.s, self.roles, self.gold, self.total_steps = config, s, roles, gold, total_steps
        self.prompt_ids, self.texts, self.columns = prompts
        self.samples, self.ks = config.eval_samples, parse_eval_k(config.eval_k)
        # the engine's log-probs are the policy's own at temperature 1 (as in training's step 3)
        self.engine_logps = exact_engine and s.temperature == 1.0
        # prompts per generate call: about one training step's samples
        self.chunk = max(1, config.batch_size * s.group_size // self.samples)
        self.last: dict[str, float] = {}
        # multi-turn runs: the driver's EpisodeRunner and the held-out rows (each episode's reset)
        self.episodes, self.rows = None, None

    def due(self, step: int) -> bool:
        return step == 0 or step % self.config.eval_steps == 0 or step == self.total_steps

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """The eval/* metrics of the policy after `step` updates (see the module docstring)."""
        started = time.perf_counter()
        parts = []
        with preserved_rng(self.roles.device), reward_batch(step, self.total_steps, validation=True):
            for start in range(0, len(self.prompt_ids), self.chunk):
                parts.append(self._chunk(step, start, min(start + self.chunk, len(self.prompt_ids))))
        reshard(self.roles.trainer.engine)
        reward, lengths = torch.cat([p["reward"] for p in parts]), torch.cat([p["length"] for p in parts])
        graded = torch.cat([p["gold"] if self.gold is not None else p["reward"] for p in parts])
        correct = torch.cat([p["groups"] for p in parts])[graded >= self.config.eval_pass_threshold]
        counts = torch.bincount(correct, minlength=len(self.prompt_ids)).tolist()  # correct samples per prompt
        metrics = {"eval/reward": reward.mean().item(), "eval/length": lengths.float().mean().item()}
        if self.gold is not None:
            metrics["eval/gold"] = torch.cat([p["gold"] for p in parts]).mean().item()
        metrics.update({f"eval/pass@{k}": mean_pass_at_k(counts, self.samples, k) for k in self.ks})
        if self.roles.reference is not None:
            metrics["eval/kl"] = torch.cat([p["kl"] for p in parts]).mean().item()
        metrics["time/eval_s"] = time.perf_counter() - started
        self.last = metrics
        return metrics

    def _chunk(self, step: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Prompts start..stop-1 x K samples: their scores, lengths, KL and prompt indices."""
        s, roles = self.s, self.roles
        sampling = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                  top_k=s.top_k, seed=eval_seed(self.config.seed, step),
                                  first_sample=start * self.samples)  # noise keyed on the global sample
        episodes = None
        if self.episodes is not None:  # multi-turn: held-out conversations, scored as in training
            held_out = [{**self.rows[i], "__row__": i} for i in range(start, stop)]
            episodes = self.episodes.run(roles.rollout, held_out, self.samples, sampling)
            check_episodes_agree(episodes, distributed.current(), self.episodes.env_name)
            rollout = episodes.rollout
        else:
            rollout = roles.rollout.generate(self.prompt_ids[start:stop], self.samples, sampling)
        batch = SequenceBatch.from_rollout(rollout, roles.tokenizer.pad_token_id).to(roles.device)
        rows = [start + g for g in rollout.group_index.tolist()]
        keys = {k for c in self.columns for k in c}
        columns = {k: [self.columns[r].get(k) for r in rows] for k in keys}
        prompts = [self.texts[r] for r in rows]
        if episodes is not None:
            completions = episodes.final_answers()
            columns[CONVERSATION_COLUMN] = episodes.messages
        else:
            completions = decode_completions(roles.tokenizer, rollout)
        reward = raw_scores(roles.reward, batch, prompts, completions, columns)
        if episodes is not None:  # the environment's turn rewards count too
            reward = reward + episodes.returns
        out = {"reward": reward, "length": rollout.lengths.cpu(), "groups": torch.tensor(rows)}
        if self.gold is not None:
            out["gold"] = raw_scores(self.gold, batch, prompts, completions, columns)
        if roles.reference is not None:
            mask = batch.response_mask  # (N, L)
            policy = (rollout.response_logprobs.to(roles.device) if self.engine_logps
                      else roles.trainer.logps(batch))  # (N, L)
            kl = torch.where(mask, KL["k1"](policy, roles.reference.logps(batch)), 0.0)
            out["kl"] = kl.sum(-1).cpu()  # (N,) summed over each response's tokens
        return out


def make_validation(config: TrainConfig, s: OnlineSettings, roles, *, total_steps: int, exact_engine: bool,
                    eval_data: Any = None, gold_reward: Any = None) -> Validation | NoValidation:
    """The run's validation: held-out prompts from `eval_data` (else --eval-data, its test or
    validation split for a directory of splits), or `NoValidation` without any."""
    from alignkit.data import EVAL_SPLITS
    from alignkit.training.online.loop import (  # loop imports this module
        load_prompt_table,
        prompt_rows,
    )

    source = eval_data if eval_data is not None else config.eval_data
    if source is None:
        if gold_reward is not None:
            raise ValueError("a gold reward applies to validation: pass eval_data (held-out prompts) and eval_steps")
        return NoValidation()
    table = load_prompt_table(source, split=EVAL_SPLITS, data_format=config.data_format)
    ids, texts, columns, _ = prompt_rows(table, roles.tokenizer, config)
    validation = Validation(config, s, roles, (ids, texts, columns), load_gold_reward(config, s, gold_reward),
                            total_steps=total_steps, exact_engine=exact_engine)
    validation.rows = table.rows
    return validation
