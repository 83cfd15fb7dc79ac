"""Online batches across torchrun ranks: whole prompt groups per rank, gathered back whole.

The online driver is replicated: every rank holds the global batch of rollouts, rewards,
advantages (steps 2, 4, 5 are cheap and computed identically everywhere, so they need no
collective of their own). Only the expensive steps are split by rows:

- step 1: rank r samples a contiguous block of the B prompts (`prompt_block`), all G samples of
  each, with `first_sample` = its first global row, so the counter-based noise is the noise one
  process draws; `gather_rollout` gives every rank the global `Rollout`, row order unchanged
  (a VLM prompt's pixel inputs go with it to its rank's engine; every rank holds all of them);
- step 3: log-probs and values of a rank's rows, gathered with `gather_rows`;
- step 6: each minibatch's rows are split again (`distributed.shard_rows`) and the loss is
  normalised by the minibatch's global token or sequence count, which every rank can compute
  from the global masks.

All gathers pad to the largest rank's rows and widths and pack into float64 (token ids
< 2^53 and float32 log-probs are exact in it), one all-gather per tensor family.

Multi-turn rollouts (`alignkit.agents`) are split per round of turns: the episode runner's
`engine.generate` of a round's active conversations is this wrapper's, so each rank samples a
block of them (noise keyed on the position in the round, as in one process) and every rank
gets the whole round back. Every rank then holds every conversation and runs every
environment step and tool call itself: environments must be deterministic functions of the
conversation (and their own seeded state), which `check_episodes_agree` verifies after each
batch of episodes. A simulated user (`--user-model`) samples on the rank's own engine
(`rank_local`), replicated likewise.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import torch
from torch import Tensor

from alignkit.rewards.dense import DenseRewards
from alignkit.rollout import Rollout, SamplingParams
from alignkit.training.run.distributed import Ranks, all_gather_equal, all_reduce_sum


def prompt_block(n_prompts: int, rank: int, world: int) -> range:
    """The prompts rank `rank` samples: a contiguous block of ceil(B / W) (the last may be
    shorter or empty)."""
    per_rank = math.ceil(n_prompts / world)
    start = min(rank * per_rank, n_prompts)
    return range(start, min(start + per_rank, n_prompts))


def _all_gather_padded(local: Tensor) -> list[Tensor]:
    """Every rank's `local` (any shapes of one rank count), float64 on the CPU: the shapes are
    gathered first, then each tensor zero-padded to the largest."""
    sizes = all_gather_equal(torch.tensor(list(local.shape), dtype=torch.float64))
    largest = torch.stack(sizes).amax(0).long().tolist()
    padded = torch.zeros(largest, dtype=torch.float64)
    padded[tuple(slice(0, n) for n in local.shape)] = local.double().cpu()
    gathered = all_gather_equal(padded)
    return [g[tuple(slice(0, int(n)) for n in size.tolist())] for g, size in zip(gathered, sizes, strict=True)]


def gather_rows(local: Tensor, ranks: Ranks, width: int | None = None) -> Tensor:
    """Concatenate every rank's rows (N_r, ...) in rank order, the other dimensions zero padded
    to the largest rank's (dimension 1 to `width` when given)."""
    if not ranks.distributed:
        return local
    parts = _all_gather_padded(local)
    trailing = [max(p.shape[d] for p in parts) for d in range(1, local.dim())]
    if width is not None:
        trailing[0] = width
    out = torch.zeros((sum(p.shape[0] for p in parts), *trailing), dtype=local.dtype)
    row = 0
    for part in parts:
        out[(slice(row, row + part.shape[0]), *(slice(0, n) for n in part.shape[1:]))] = part.to(local.dtype)
        row += part.shape[0]
    return out.to(local.device)


def generate_sharded(generate, prompt_ids: list[list[int]], n: int, sampling: SamplingParams,
                     ranks: Ranks, device: torch.device | None = None, pad_id: int = 0,
                     prefixes: list[list[int]] | None = None, prompt_inputs: list | None = None) -> Rollout:
    """`generate(prompts, n, sampling)` of this rank's block of prompts, gathered into the global
    `Rollout` every rank then holds (one process: a plain call). `prefixes` (one per global row,
    DR-PO's roll-in) are split with the rows; `prompt_inputs` (one per prompt, a VLM's pixel
    inputs) with the prompts, and the global rollout carries every row's (each rank holds all)."""
    extra = {} if prefixes is None else {"prefixes": prefixes}
    if prompt_inputs is not None:
        extra["prompt_inputs"] = prompt_inputs
    if not ranks.distributed:
        return generate(prompt_ids, n, sampling, **extra)
    block = prompt_block(len(prompt_ids), ranks.rank, ranks.world)
    local = None
    if len(block):
        if prefixes is not None:
            extra["prefixes"] = prefixes[block.start * n : block.stop * n]
        if prompt_inputs is not None:
            extra["prompt_inputs"] = prompt_inputs[block.start : block.stop]
        local = generate([prompt_ids[i] for i in block], n,
                         dataclasses.replace(sampling, first_sample=sampling.first_sample + block.start * n), **extra)
    rollout = gather_rollout(local, prompt_ids, n, ranks, device, pad_id, rolled_in=prefixes is not None)
    if prompt_inputs is None:
        return rollout
    return dataclasses.replace(rollout, prompt_inputs=[prompt_inputs[i // n] for i in range(len(prompt_ids) * n)])


def gather_rollout(local: Rollout | None, prompt_ids: list[list[int]], n: int, ranks: Ranks,
                   device: torch.device | None = None, pad_id: int = 0, rolled_in: bool = False) -> Rollout:
    """The global rollout from each rank's block (`local` None on a rank without prompts);
    responses right-padded with `pad_id`, as an engine pads them. `rolled_in`: the rows carry
    a `rollin_mask` (every rank's call forced prefixes), gathered as a fourth channel. An
    `env_mask` (multi-turn rows) travels as a fifth channel; the global rollout has one when
    any rank's block had one (a block without: no environment tokens)."""
    channels = 5
    if local is None:
        packed = torch.zeros((0, 1, channels), dtype=torch.float64)
        stopped = torch.zeros((0, 1), dtype=torch.float64)
        stats = torch.zeros(4, dtype=torch.float64)
    else:
        nothing = torch.zeros_like(local.response_mask, dtype=torch.float64)
        parts = [local.response_ids.double(), local.response_logprobs.double(), local.response_mask.double(),
                 local.rollin_mask.double() if rolled_in else nothing,
                 local.env_mask.double() if local.env_mask is not None else nothing]
        packed = torch.stack([part.cpu() for part in parts], dim=-1)  # (N_r, L_r, 5)
        stopped = torch.tensor([[reason == "stop"] for reason in local.finish_reason], dtype=torch.float64)
        stats = torch.tensor([float(local.extras.get("generated_tokens", 0)),
                              float(local.extras.get("decoded_rows", 0)), float(local.extras.get("seconds", 0.0)),
                              float(local.env_mask is not None)], dtype=torch.float64)
    rows = gather_rows(packed, ranks)  # (N, L, 5)
    finished = gather_rows(stopped, ranks).reshape(-1)
    totals = all_reduce_sum(stats)
    target = device if device is not None else (local.response_ids.device if local is not None else None)
    mask = rows[..., 2] > 0.5
    width = max(1, int(mask.sum(-1).max().item())) if len(rows) else 1
    return Rollout(
        prompt_ids=[list(prompt) for prompt in prompt_ids for _ in range(n)],
        response_ids=torch.where(mask[:, :width], rows[:, :width, 0].long(), pad_id).to(target),
        response_logprobs=rows[:, :width, 1].float().to(target),
        response_mask=mask[:, :width].to(target),
        finish_reason=["stop" if hit > 0.5 else "length" for hit in finished.tolist()],
        group_index=torch.arange(len(prompt_ids), device=target).repeat_interleave(n),
        extras={"generated_tokens": int(totals[0]), "decoded_rows": int(totals[1]),
                "seconds": float(totals[2]) / ranks.world,
                "seed": None if local is None else local.extras.get("seed")},
        rollin_mask=(rows[:, :width, 3] > 0.5).to(target) if rolled_in else None,
        env_mask=(rows[:, :width, 4] > 0.5).to(target) if totals[3] > 0 else None,
    )


def rank_local(engine):
    """The engine this rank samples on by itself: inside a `ShardedRollout`, the wrapped one
    (no collective per call). Callers from threads in an order that may differ between ranks
    (a simulated user's turns) must use it: a collective per call would pair different calls."""
    return engine.engine if isinstance(engine, ShardedRollout) else engine


def episodes_fingerprint(episodes) -> Tensor:
    """(4,) float64 summary of a batch of episodes that any divergence between ranks changes:
    the CRC-32 of the token ids, of the environment mask, of the turn rewards and turn ends,
    and of the episodes' finishes (each < 2^32: exact in float64)."""
    rollout = episodes.rollout
    env = rollout.env_mask if rollout.env_mask is not None else torch.zeros_like(rollout.response_mask)
    tokens = torch.where(rollout.response_mask, rollout.response_ids, -1).cpu().numpy().tobytes()
    turns = repr([[float(r) for r in rewards] for rewards in episodes.turn_rewards]) + repr(episodes.turn_ends)
    finishes = repr(rollout.extras.get("episode_finish", []))
    return torch.tensor([zlib.crc32(tokens), zlib.crc32(env.cpu().numpy().tobytes()), zlib.crc32(turns.encode()),
                         zlib.crc32(finishes.encode())], dtype=torch.float64)


def check_episodes_agree(episodes, ranks: Ranks, what: str) -> None:
    """Every rank holds every conversation (see the module docstring): raise a ValueError when
    the ranks' episodes differ, i.e. `what` (the environment) answered the same conversation
    differently on two ranks (unseeded randomness, wall-clock timeouts, outside services)."""
    if not ranks.distributed:
        return
    prints = all_gather_equal(episodes_fingerprint(episodes))
    if any(not torch.equal(p, prints[0]) for p in prints[1:]):
        raise ValueError(f"{what} gave different episodes on different torchrun ranks: every rank replays every "
                         "conversation, so an environment (its steps, tools, simulated user) must be deterministic "
                         "given the conversation and its seeded state")


def rank_rows(fn, batch, ranks: Ranks, lockstep: bool = False) -> Tensor:
    """`fn(batch) -> (N, L)` computed on this rank's contiguous block of rows and gathered: the
    no-grad log-probs and values of step 3, split across ranks instead of repeated.

    `lockstep` (FSDP2: every forward is a collective): every rank computes ceil(N / W) rows, a
    short block padded with copies of row 0 whose outputs are dropped."""
    if not ranks.distributed:
        return fn(batch)
    block = prompt_block(len(batch), ranks.rank, ranks.world)
    width, device = batch.response_mask.shape[1], batch.input_ids.device
    rows = list(block)
    if lockstep:
        rows += [0] * (math.ceil(len(batch) / ranks.world) - len(rows))
    if rows:
        local = fn(batch.select(torch.tensor(rows, device=device))).float()[: len(block)]
    else:
        local = torch.zeros((0, 1), device=device)
    return gather_rows(local, ranks, width=width)


class CopyRollout:
    """The rollout engine of an FSDP2 policy: an unsharded copy of the policy (taken before it
    was sharded), refreshed from the trainer's full weights after every update. Sampling a
    sharded model would hang: ranks that stop decoding early leave the others' collectives.
    Its log-probs are the policy's (same weights), so the on-policy shortcut still holds."""

    shares_policy = False
    exact_logprobs = True
    merged_weights = False  # the copy keeps the policy's own parameter names (LoRA unmerged)

    def __init__(self, engine) -> None:
        self.engine = engine
        self.params = dict(engine.model.named_parameters())
        self.supports_rollin = getattr(engine, "supports_rollin", False)

    @property
    def version(self) -> int:
        return self.engine.version

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams,
                 prefixes: list[list[int]] | None = None, prompt_inputs: list | None = None) -> Rollout:
        extra = {} if prompt_inputs is None else {"prompt_inputs": prompt_inputs}
        return self.engine.generate(prompt_ids, n, sampling, prefixes=prefixes, **extra)

    @torch.no_grad()
    def update_weights(self, source, version: int) -> None:
        for name, tensor in source:
            self.params[name].copy_(tensor)
        self.engine.version = version


class ShardedRollout:
    """A rollout engine shared by W torchrun ranks: each samples its block of prompt groups
    (`generate_sharded`) and every rank gets the global rollout. Weight sync passes through."""

    def __init__(self, engine, ranks: Ranks) -> None:
        self.engine, self.ranks = engine, ranks
        self.shares_policy = engine.shares_policy
        self.exact_logprobs = getattr(engine, "exact_logprobs", engine.shares_policy)
        self.supports_rollin = getattr(engine, "supports_rollin", False)

    @property
    def merged_weights(self) -> bool:
        return getattr(self.engine, "merged_weights", True)

    @property
    def wants_base(self) -> bool:
        return getattr(self.engine, "wants_base", False)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams,
                 prefixes: list[list[int]] | None = None, prompt_inputs: list | None = None) -> Rollout:
        return generate_sharded(self.engine.generate, prompt_ids, n, sampling, self.ranks, pad_id=self.pad_id,
                                prefixes=prefixes, prompt_inputs=prompt_inputs)

    @property
    def pad_id(self) -> int:
        """The pad id of the innermost engine (wrappers keep theirs in `.engine`)."""
        engine = self.engine
        while not hasattr(engine, "pad_id") and hasattr(engine, "engine"):
            engine = engine.engine
        return int(getattr(engine, "pad_id", 0))

    @property
    def version(self) -> int:
        return self.engine.version

    def update_weights(self, source, version: int) -> None:
        self.engine.update_weights(source, version)

    def close(self) -> None:
        getattr(self.engine, "close", lambda: None)()


class ShardedReference:
    """The reference role under torchrun: each rank scores its block of rows, gathered
    (`lockstep` when the reference runs through the FSDP2-sharded policy)."""

    def __init__(self, reference, ranks: Ranks, lockstep: bool = False) -> None:
        self.reference, self.ranks, self.lockstep = reference, ranks, lockstep

    def logps(self, batch) -> Tensor:
        return rank_rows(self.reference.logps, batch, self.ranks, self.lockstep)

    def distributions(self, batch) -> Tensor:
        return rank_rows(self.reference.distributions, batch, self.ranks, self.lockstep)


class ShardedReward:
    """A reward model under torchrun: each rank scores its block of rows, the scores are
    gathered (a reward *function* stays replicated: it may be any Python callable). Dense
    rewards (a segment reward model's) are gathered as (N, L) rows; when any rank's block is
    dense, every rank's is (scalar rows on their last token)."""

    def __init__(self, reward, ranks: Ranks) -> None:
        self.reward, self.ranks = reward, ranks

    @property
    def name(self) -> str:
        return str(getattr(self.reward, "name", type(self.reward).__name__))

    def score(self, batch, prompts: list[str], completions: list[str], columns: dict[str, list]):
        block = prompt_block(len(batch), self.ranks.rank, self.ranks.world)
        device, width = batch.input_ids.device, batch.response_mask.shape[1]
        lengths = batch.response_mask.sum(-1).cpu()
        if len(block):
            rows = torch.arange(block.start, block.stop, device=device)
            scores, penalised = self.reward.score(batch.select(rows), prompts[block.start : block.stop],
                                                  completions[block.start : block.stop],
                                                  {k: v[block.start : block.stop] for k, v in columns.items()})
        else:
            scores, penalised = torch.zeros(0), 0
        total = all_reduce_sum(torch.tensor([float(penalised), float(isinstance(scores, DenseRewards))],
                                            dtype=torch.float64))
        if total[1] == 0:
            gathered = gather_rows(scores.float().reshape(-1, 1), self.ranks, width=1).reshape(-1)
            return gathered, int(total[0])
        if not isinstance(scores, DenseRewards):  # this rank's rows scalar (or none): on their last token
            scores = DenseRewards.at_last_token(scores, lengths[block.start : block.stop])
        tokens = gather_rows(scores.tokens.float().cpu(), self.ranks, width=width)  # (N, L)
        return DenseRewards(tokens, lengths), int(total[0])
