"""Steps 1-2 of the online loop (generate, score) and DAPO's dynamic sampling: the sampler
calls the rollout engine (`RolloutEngine.generate`) and the reward role (`RewardRole.score`).

The prompt stream is one deterministic sequence: position p (0-based, over the whole run) is
prompt `perm_e[p mod n]` of epoch e = p // n, where perm_e is a permutation seeded by
(seed, e). A step draws its prompts B at a time from a cursor (`PromptSampler.position`), and
the checkpoint stores that cursor, so a resumed run draws exactly the prompts, and with
`step_seed` exactly the samples, that the interrupted run would have drawn.

Dynamic sampling (DAPO, Yu et al. 2025, section 3.2; verl's recipe/dapo `filter_groups`):
the DAPO objective is taken over groups with 0 < |{o_i : is_equivalent(a, o_i)}| < G, i.e.
groups whose rewards are not all equal (a group with equal rewards has advantage 0 for every
sample and no gradient). A step therefore *over-samples*:

    round r = 1, 2, ...: draw the next B prompts, generate G samples each, score them;
                         keep the groups with max(r_g) > min(r_g) (and singleton groups);
    until the kept groups number >= B: the first B kept groups (in generation order) are
    the training batch, the surplus is dropped (verl: `batch[:train_batch_size * n]`).

The filter looks at the shaped sequence reward (missing-EOS penalty, PPO-max normalisation
and clipping applied, KL shaping not: verl's "acc"/"seq_reward" metrics). At most
`max_generation_rounds` rounds are generated (verl's `max_num_gen_batches`; verl defaults to
0 = no limit, ours to 10 since our prompt stream cycles instead of ending with the epoch). When the bound is reached with fewer than B kept groups, verl raises an error
("Generated too many. Please check if your data are too difficult."); that is the default
here (`rounds_exhausted="raise"`). `rounds_exhausted="train"` instead trains on the groups
it has; a step with none skips its update (logged, metric `dynamic_sampling/skipped_update`).
With 0 (no limit), a reward that never varies keeps a step generating (logged every 10 rounds).

Metrics: dynamic_sampling/generation_rounds (rounds this step), /kept_fraction (groups with
reward variance / groups generated, before the surplus is dropped), /kept_groups (groups
trained on), /skipped_update. reward/*, response_length and rollout/eos_fraction describe
every sample generated in the step, kept or not. --epochs sets the number of steps
(epochs x n / B); refills draw further prompts on top of that.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.agents.branching import reset_turns, run_branched
from alignkit.objectives.filters import filter_rows
from alignkit.rewards.dense import DenseRewards, sequence_scores
from alignkit.rollout import Rollout, SamplingParams
from alignkit.training.online.cgpo import METRIC_PREFIX
from alignkit.training.online.distributed_rollout import check_episodes_agree
from alignkit.training.online.dpa import DIRECTION_COLUMN
from alignkit.training.online.kl_control import RunningMeanStd
from alignkit.training.online.nash import OPPONENT_ROUND
from alignkit.training.online.reset import rollin_prefixes
from alignkit.training.online.roles import SequenceBatch, decode_completions
from alignkit.training.online.settings import OnlineSettings
from alignkit.training.online.steps import (
    check_dense_settings,
    dense_use,
    greedy_baseline,
    places_dense,
    shape_dense_rewards,
    shape_rewards,
)
from alignkit.training.run import distributed

log = logging.getLogger("alignkit")


def step_seed(seed: int, step: int, round_: int = 0) -> int:
    """Engine seed of generation round `round_` (0-based) of a step: a function of (seed, step,
    round) only, so a resumed run regenerates exactly the samples the interrupted run drew.
    7919 and 104729 are primes, so (step, round) pairs with round < 7919 never collide."""
    return (seed * 1_000_003 + step * 7_919 + round_ * 104_729) % 2**62


def reset_seed(seed: int, step: int, round_: int = 0) -> int:
    """Seed of a generation round's dataset-reset draws (drpo): a function of (seed, step,
    round), apart from the engine's sampling noise (`step_seed`)."""
    return (step_seed(seed, step, round_) + 0x9E37_79B9_7F4A_7C15) % 2**62


def prompt_indices(n_prompts: int, start: int, count: int, seed: int) -> list[int]:
    """Prompts at stream positions start .. start + count - 1 (see the module docstring)."""
    out, orders = [], {}
    for position in range(start, start + count):
        epoch, offset = divmod(position, n_prompts)
        if epoch not in orders:
            order = list(range(n_prompts))
            random.Random(seed * 7_777 + epoch).shuffle(order)
            orders[epoch] = order
        out.append(orders[epoch][offset])
    return out


def signal_groups(rewards: Tensor, group_index: Tensor) -> Tensor:
    """Sorted ids of the groups whose rewards are not all equal (max > min), plus singleton
    groups (verl keeps those too: with G = 1 there is no group to compare within)."""
    groups, inverse = torch.unique(group_index, return_inverse=True)
    high = rewards.new_full((len(groups),), -float("inf")).scatter_reduce(0, inverse, rewards, "amax")
    low = rewards.new_full((len(groups),), float("inf")).scatter_reduce(0, inverse, rewards, "amin")
    counts = torch.bincount(inverse, minlength=len(groups))
    return groups[(high > low) | (counts == 1)]


def merge_rows(parts: list[tuple[Rollout, Tensor]], pad_id: int) -> Rollout:
    """Rows `rows` of each rollout, concatenated in order and right-padded to the widest; the
    groups are renumbered 0, 1, ... in order of appearance (distinct across rollouts)."""
    width = max(rollout.response_ids.shape[1] for rollout, _ in parts)
    ids, logps, masks, prompts, reasons, groups, rollins, inputs = [], [], [], [], [], [], [], []
    offset = 0
    for rollout, rows in parts:
        pad = width - rollout.response_ids.shape[1]
        ids.append(F.pad(rollout.response_ids[rows], (0, pad), value=pad_id))
        logps.append(F.pad(rollout.response_logprobs[rows], (0, pad), value=0.0))
        masks.append(F.pad(rollout.response_mask[rows], (0, pad), value=False))
        if rollout.rollin_mask is not None:
            rollins.append(F.pad(rollout.rollin_mask[rows], (0, pad), value=False))
        prompts += [rollout.prompt_ids[i] for i in rows.tolist()]
        if rollout.prompt_inputs is not None:  # a VLM's pixel inputs stay with their rows
            inputs += [rollout.prompt_inputs[i] for i in rows.tolist()]
        reasons += [rollout.finish_reason[i] for i in rows.tolist()]
        groups.append(rollout.group_index[rows] + offset)
        offset += int(rollout.group_index.max().item()) + 1
    _, group_index = torch.unique(torch.cat(groups), return_inverse=True)
    return Rollout(prompts, torch.cat(ids), torch.cat(logps), torch.cat(masks), reasons, group_index,
                   rollin_mask=torch.cat(rollins) if rollins else None, prompt_inputs=inputs or None)


def merge_dense(parts: list[Tensor], width: int) -> Tensor:
    """Dense rewards (N_r, L_r) of `merge_rows`'s parts (their selected rows), concatenated and
    zero-padded to the merged width, so they stay aligned with the merged responses."""
    return torch.cat([F.pad(part, (0, width - part.shape[1]), value=0.0) for part in parts])


CONVERSATION_COLUMN = "conversation"
"""Multi-turn rollouts: the column with each row's whole conversation (a list of messages)."""


def episode_scores(episodes, scores, dense: bool, name: str):
    """A multi-turn batch's rewards: each turn's environment reward at its last token plus the
    run's reward of the final answer (`scores`, (N,)) at the episode's last token; as
    `DenseRewards` when the advantage places rewards at their tokens (`dense`), else the
    (N,) episode returns."""
    if isinstance(scores, DenseRewards):
        raise ValueError(f"reward {name} gives per-token rewards; in a multi-turn rollout a reward scores the "
                         "final answer (one number per episode), and the environment rewards each turn")
    final = scores.float().cpu()
    if not dense:
        return episodes.returns + final
    tokens = episodes.turn_rewards_dense()
    lengths = episodes.rollout.lengths
    tokens[torch.arange(len(lengths)), lengths - 1] += final
    return DenseRewards(tokens, lengths)


def role_name(role) -> str:
    """A reward role's name for messages: its reward function's, else its class's."""
    return str(getattr(role, "name", type(role).__name__))


def drain_components(scorer) -> dict[str, Tensor]:
    """A `MultiReward`'s per-reward scores since the last call (empty for one reward)."""
    drain = getattr(scorer, "drain", None)
    return drain() if drain is not None else {}


@dataclass
class StepSamples:
    """What steps 1-2 hand to the update: the training rows, and statistics of every sample
    generated this step (all rounds, kept or not) for the log.

    rollout, raw, rewards, no_eos, baseline: the training rows, (N,) each (baseline only for
    ReMax); rollout is None when no group was kept. generated_*: all samples of all rounds.
    With dense rewards (`alignkit.rewards.dense`) raw and rewards are the per-sample sums and
    `dense` the shaped per-token rewards.
    """

    rollout: Rollout | None
    raw: Tensor
    rewards: Tensor
    no_eos: Tensor
    baseline: Tensor | None
    generated_raw: Tensor
    generated_rewards: Tensor
    generated_no_eos: Tensor
    generated_lengths: Tensor
    penalised: int
    rounds: int
    groups_generated: int
    groups_with_signal: int
    kept_groups: int
    generation_s: float
    scoring_s: float
    components: dict[str, Tensor] = field(default_factory=dict)
    """Several rewards: each one's raw scores over every sample generated (reward/NAME)."""
    extra_metrics: dict[str, float] = field(default_factory=dict)
    """sample_filter: filter/kept_samples and filter/kept_reward_mean (raw reward); nash_md: nash/*."""
    costs: Tensor | None = None
    """safe_ppo: (N,) raw costs of the training rows (one generation round, unfiltered)."""
    unfiltered: tuple[Tensor, Tensor] | None = None
    """--set sample_filter: the (shaped rewards, group index) of the rows before filtering,
    whose variance says whether the step carried a signal."""
    dense: Tensor | None = None
    """Dense rewards: (N, L) shaped per-token rewards of the training rows, aligned with
    `rollout.response_mask` (missing-EOS and overlong penalties on the last token); None for
    one reward per sample."""

    def metrics(self, dynamic_sampling: bool) -> dict[str, float]:
        raw, lengths = self.generated_raw, self.generated_lengths.float()
        out = {
            "reward/mean": raw.mean().item(), "reward/std": raw.std().item() if len(raw) > 1 else 0.0,
            "reward/shaped_mean": self.generated_rewards.mean().item(), "reward/penalised_rows": self.penalised,
            "response_length": lengths.mean().item(),
            "rollout/eos_fraction": 1.0 - self.generated_no_eos.float().mean().item(),
            "throughput/generated_tokens_per_s": lengths.sum().item() / max(self.generation_s, 1e-9),
            "time/generation_s": self.generation_s, "time/scoring_s": self.scoring_s,
        }
        out.update({(name if name.startswith(METRIC_PREFIX) else f"reward/{name}"): scores.mean().item()
                    for name, scores in self.components.items()})  # cgpo's judges/...: their own names
        out.update(self.extra_metrics)
        if dynamic_sampling:
            out.update({
                "dynamic_sampling/generation_rounds": float(self.rounds),
                "dynamic_sampling/kept_fraction": self.groups_with_signal / self.groups_generated,
                "dynamic_sampling/kept_groups": float(self.kept_groups),
                "dynamic_sampling/skipped_update": float(self.rollout is None),
            })
        return out


class PromptSampler:
    """Draws, generates and scores a step's prompts; with dynamic sampling, refills the batch.

    `position` is the data cursor (prompts drawn so far): checkpoints save it (`state`) and a
    resumed run restores it (`load_state`).
    """

    def __init__(self, engine, scorer, tokenizer, prompt_ids: list[list[int]], prompt_texts: list[str],
                 columns: list[dict], s: OnlineSettings, *, batch_size: int, seed: int, device,
                 reward_stats: RunningMeanStd, cost=None, opponent=None, directions=None,
                 reset_responses: list | None = None, episodes=None, rows: list[dict] | None = None,
                 prompt_inputs: list | None = None, suppress_token_ids: tuple[int, ...] = ()) -> None:
        self.engine, self.scorer, self.tokenizer, self.cost = engine, scorer, tokenizer, cost
        self.opponent = opponent  # nash_md: NashOpponent (training/online/nash.py)
        self.directions = directions  # dpa: DirectionalPrompts (training/online/dpa.py)
        self.round_metrics: dict[str, float] = {}
        self.prompt_ids, self.prompt_texts, self.columns = prompt_ids, prompt_texts, columns
        self.prompt_inputs = prompt_inputs  # a VLM's pixel inputs per prompt row (None: text prompts)
        self.suppress_token_ids = suppress_token_ids  # a VLM's image placeholders: never sampled
        self.s, self.batch_size, self.seed, self.device = s, batch_size, seed, device
        self.reward_stats = reward_stats
        self.reset_responses = reset_responses  # drpo: each prompt row's offline response ids (or None)
        self.episodes, self.rows = episodes, rows  # multi-turn: an agents.EpisodeRunner and the dataset rows
        self.pad_id = tokenizer.pad_token_id
        self.position = 0
        self.dense_noted = False  # the log says once how the settings use dense rewards

    def state(self) -> dict[str, int]:
        """The data cursor, as checkpoint extras."""
        return {"prompt_position": self.position}

    def load_state(self, extras: dict, step: int) -> None:
        """Restore the cursor; a checkpoint without one is from a run of B prompts per step."""
        self.position = int(extras.get("prompt_position", step * self.batch_size))

    def generate_round(self, step: int, round_: int):
        """Round `round_` of step `step`: the next B prompts x G samples, scored.

        Returns (rollout, raw, rewards, no_eos, penalised, baseline, dense, generation_s,
        scoring_s), dense the shaped (N, L) per-token rewards or None; with a cost role
        (safe_ppo) its (N,) costs are kept as `self.round_costs`.
        """
        s = self.s
        indices = prompt_indices(len(self.prompt_ids), self.position, self.batch_size, self.seed)
        prompt_ids, directions = [self.prompt_ids[i] for i in indices], None
        if self.directions is not None:  # dpa: each prompt under its drawn direction's system prompt
            positions = list(range(self.position, self.position + self.batch_size))
            prompt_ids, directions = self.directions.prompts(indices, positions, step, round_)
        self.position += self.batch_size
        started = time.perf_counter()
        sampling = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                  top_k=s.top_k, seed=step_seed(self.seed, step, round_),
                                  suppress_token_ids=self.suppress_token_ids)
        extra = {}
        if self.reset_responses is not None:  # drpo: each row rolls in a prefix of its offline response
            extra["prefixes"] = rollin_prefixes([self.reset_responses[i] for i in indices], s.group_size,
                                                s.reset_prob, reset_seed(self.seed, step, round_))
        if self.prompt_inputs is not None:  # with the prompt ids into the engine's prefill
            extra["prompt_inputs"] = [self.prompt_inputs[i] for i in indices]
        episodes = None
        if self.episodes is not None:  # multi-turn: conversations with tools / an environment
            rows = [{**self.rows[i], "__row__": i} for i in indices]
            if s.pairwise_loss == "refuel" and s.objective == "pairwise":  # two futures of a reset turn each
                resets = reset_turns(len(rows), s.max_turns, reset_seed(self.seed, step, round_))
                episodes = run_branched(self.episodes, self.engine, rows, sampling, resets, s.group_size)
            else:
                episodes = self.episodes.run(self.engine, rows, s.group_size, sampling)
            check_episodes_agree(episodes, distributed.current(), self.episodes.env_name)  # replayed on every rank
            rollout = episodes.rollout
            self.round_metrics.update(episodes.metrics)
        else:
            rollout = self.engine.generate(prompt_ids, s.group_size, sampling, **extra)
        generated = time.perf_counter()
        batch = SequenceBatch.from_rollout(rollout, self.pad_id).to(self.device)
        rows = [indices[g] for g in rollout.group_index.tolist()]
        keys = {k for c in self.columns for k in c}
        row_columns = {k: [self.columns[r].get(k) for r in rows] for k in keys}
        if directions is not None:
            row_columns[DIRECTION_COLUMN] = directions[rollout.group_index].tolist()
        prompts = [self.prompt_texts[r] for r in rows]
        if episodes is not None:  # the reward sees the final answer, and the conversation by name
            completions = episodes.final_answers()
            row_columns[CONVERSATION_COLUMN] = episodes.messages
        else:
            completions = decode_completions(self.tokenizer, rollout)
        scores, penalised = self.scorer.score(batch, prompts, completions, row_columns)
        if episodes is not None:
            scores = episode_scores(episodes, scores, places_dense(s), role_name(self.scorer))
        if self.cost is not None:
            costs = self.cost.score(batch, prompts, completions, row_columns)[0]
            if isinstance(costs, DenseRewards):
                raise ValueError(f"cost {role_name(self.cost)} gives per-token costs of shape "
                                 f"{tuple(costs.tokens.shape)}; safe_ppo constrains one cost per sample: return one "
                                 "number per sample")
            self.round_costs = costs.to(self.device)
        self.components.append(drain_components(self.scorer))  # several rewards: each one's raw scores
        raw = sequence_scores(scores).to(self.device)  # dense rewards: each sample's sum
        if self.opponent is not None:  # nash_md: the reward is p = P(y > y') against a mixture sample
            opponent_sampling = dataclasses.replace(sampling, seed=step_seed(self.seed, step, OPPONENT_ROUND + round_))
            raw, self.round_metrics = self.opponent.preferences(prompt_ids, s.group_size, opponent_sampling, batch,
                                                                prompts, completions, row_columns, raw)
        no_eos = torch.tensor([reason != "stop" for reason in rollout.finish_reason], device=self.device)
        lengths = rollout.lengths.to(self.device)
        rewards = shape_rewards(raw, no_eos, s, self.reward_stats, update=True, lengths=lengths)
        dense = None
        if self.opponent is not None:
            rewards = rewards - 0.5  # Nash-MD's control variate (the reward is p: no dense rewards)
        elif isinstance(scores, DenseRewards):
            dense = self.shaped_dense(scores, batch.response_mask, no_eos, lengths)
        baseline = None
        if s.advantage == "remax" and s.objective == "policy_gradient":
            baseline = greedy_baseline(self.engine, self.scorer, self.tokenizer, self.prompt_ids,
                                       self.prompt_texts, self.columns, indices, s, self.pad_id, self.device,
                                       self.reward_stats).repeat_interleave(s.group_size)
            drain_components(self.scorer)  # the greedy responses' scores are not samples'
        scored = time.perf_counter()
        return rollout, raw, rewards, no_eos, penalised, baseline, dense, generated - started, scored - generated

    def shaped_dense(self, scores: DenseRewards, mask: Tensor, no_eos: Tensor, lengths: Tensor) -> Tensor:
        """A round's dense rewards (N, L) shaped (`shape_dense_rewards`), after checking the
        settings take them; the first time, the log says how the advantage uses them."""
        what = f"reward {role_name(self.scorer)}"
        check_dense_settings(self.s, what, tuple(scores.tokens.shape))
        if not self.dense_noted:
            self.dense_noted = True
            log.info("%s gives dense (per-token) rewards: %s", what, dense_use(self.s))
        return shape_dense_rewards(scores.tokens.to(self.device), mask.to(self.device), no_eos, self.s, lengths)

    def collect(self, step: int) -> StepSamples:
        """Steps 1-2 of `step`: one round, or with dynamic sampling rounds until B groups with
        reward variance are kept (see the module docstring for the bound)."""
        s, target = self.s, self.batch_size
        parts, generated, kept, with_signal = [], [], 0, 0
        self.components: list[dict[str, Tensor]] = []
        generation_s = scoring_s = 0.0
        while True:
            rollout, raw, rewards, no_eos, penalised, baseline, dense, gen_s, score_s = self.generate_round(
                step, len(generated))
            generation_s, scoring_s = generation_s + gen_s, scoring_s + score_s
            generated.append((raw, rewards, no_eos, rollout.lengths, penalised))
            if not s.dynamic_sampling:
                parts.append((rollout, None, raw, rewards, no_eos, baseline, dense))
                kept = with_signal = target
                break
            groups = signal_groups(rewards, rollout.group_index.to(rewards.device))
            with_signal += len(groups)
            take = groups[: target - kept]
            kept += len(take)
            if len(take):
                rows = torch.isin(rollout.group_index.to(rewards.device), take).nonzero().squeeze(-1)
                parts.append((rollout, rows, raw[rows], rewards[rows], no_eos[rows],
                              None if baseline is None else baseline[rows], None if dense is None else dense[rows]))
            rounds = len(generated)
            if kept >= target:
                break
            if 0 < s.max_generation_rounds <= rounds:
                if s.rounds_exhausted == "raise":
                    raise ValueError(
                        f"step {step}: {rounds} generation rounds (max_generation_rounds) kept {kept} of "
                        f"{target} prompt groups with reward variance; the prompts may be too hard or "
                        "too easy. Raise max_generation_rounds (0 = no limit) or --set rounds_exhausted=train")
                log.warning("step %d: %d generation round(s) kept %d of %d prompt groups; training on those",
                            step, rounds, kept, target)
                break
            (log.warning if rounds % 10 == 0 else log.info)(
                "step %d: %d of %d prompt groups with reward variance after %d round(s); generating more",
                step, kept, target, rounds)
        if parts and parts[0][1] is None:  # no filtering: the round as generated
            rollout, _, raw, rewards, no_eos, baseline, dense = parts[0]
        elif parts:
            rollout = merge_rows([(p[0], p[1].cpu()) for p in parts], self.pad_id)
            raw, rewards, no_eos = (torch.cat([p[i] for p in parts]) for i in (2, 3, 4))
            baseline = None if parts[0][5] is None else torch.cat([p[5] for p in parts])
            dense = None if parts[0][6] is None else merge_dense([p[6] for p in parts], rollout.response_ids.shape[1])
        else:
            rollout, baseline, dense = None, None, None
            raw = rewards = torch.zeros(0, device=self.device)
            no_eos = torch.zeros(0, dtype=torch.bool, device=self.device)
        extra: dict[str, float] = dict(self.round_metrics)
        unfiltered = None
        if s.sample_filter != "none" and rollout is not None:
            rows = filter_rows(s.sample_filter, rewards, rollout.group_index, fraction=s.filter_fraction,
                               seed=step_seed(self.seed, step, 7_919), min_reward=s.filter_min_reward)
            extra.update({"filter/kept_samples": float(len(rows)),
                          "filter/kept_reward_mean": raw[rows].mean().item() if len(rows) else 0.0})
            unfiltered = (rewards, rollout.group_index)
            raw, rewards, no_eos = raw[rows], rewards[rows], no_eos[rows]
            baseline = None if baseline is None else baseline[rows]
            dense = None if dense is None else dense[rows]
            rollout = merge_rows([(rollout, rows.cpu())], self.pad_id) if len(rows) else None
        return StepSamples(
            rollout, raw, rewards, no_eos, baseline,
            generated_raw=torch.cat([g[0] for g in generated]),
            generated_rewards=torch.cat([g[1] for g in generated]),
            generated_no_eos=torch.cat([g[2] for g in generated]),
            generated_lengths=torch.cat([g[3] for g in generated]),
            penalised=sum(g[4] for g in generated), rounds=len(generated),
            groups_generated=len(generated) * target, groups_with_signal=with_signal, kept_groups=kept,
            generation_s=generation_s, scoring_s=scoring_s, extra_metrics=extra, unfiltered=unfiltered,
            costs=self.round_costs if self.cost is not None else None, dense=dense,
            components={name: torch.cat([c[name] for c in self.components]) for name in self.components[0]})
