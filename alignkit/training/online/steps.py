"""The pieces of one online step that are more than a line: reward shaping, advantages,
the policy-gradient and pairwise minibatch updates, the clipped value loss. Used by the
driver (`loop.py`), the sampler (`sampling.py`) and the trainer (`trainer.py`); each works on
tensors and the roles, never on files or the run."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from alignkit.advantages import (
    ADVANTAGE_KINDS,
    ADVANTAGES,
    gae,
    last_token_index,
    masked_mean,
    masked_whiten,
    token_level_rewards,
)
from alignkit.objectives import KL, PAIRWISE, PairLogps
from alignkit.objectives.filters import PER_GROUP_FILTERS
from alignkit.objectives.kl import capped
from alignkit.objectives.nash import inpo_h, inpo_loss
from alignkit.objectives.policy import AGGREGATIONS, POLICY_LOSSES
from alignkit.objectives.rebel import rebel_loss
from alignkit.rewards.dense import sequence_scores
from alignkit.rollout import SamplingParams
from alignkit.training.online.kl_control import RunningMeanStd
from alignkit.training.online.macro import macro_gae, macro_spans
from alignkit.training.online.roles import SequenceBatch, chunks, decode_completions
from alignkit.training.online.safe import lagrangian_advantages
from alignkit.training.online.settings import OnlineSettings, inpo_tau
from alignkit.training.run import distributed
from alignkit.training.run.degenerate import Condition, refuse
from alignkit.training.run.distributed import Ranks

GROUP_BASELINES = frozenset({"grpo", "rloo", "reinforce_pp_baseline"})
"""Advantage estimators that subtract a baseline computed from each prompt's group of samples:
with one sample per group (group_size=1) every advantage is 0 (tests/test_run_degenerate.py
checks this set against the ADVANTAGES registry)."""


def kwargs_for(fn, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that `fn` takes as keyword arguments."""
    names = set(inspect.signature(fn).parameters)
    return {k: v for k, v in values.items() if k in names}


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; verl's overlong_buffer):

        R_length(y) = 0                                    |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
    times `penalty` (verl's penalty_factor), L_max = `max_len`, L_cache = `buffer`; (N,) -> (N,).
    Longer responses cannot occur (generation stops at L_max)."""
    excess = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * excess / buffer


def shape_rewards(raw: Tensor, no_eos: Tensor, s: OnlineSettings, stats: RunningMeanStd,
                  update: bool, lengths: Tensor | None = None) -> Tensor:
    """Missing-EOS penalty, DAPO's overlong penalty (response `lengths` (N,)), then PPO-max
    running normalisation and clipping: (N,) -> (N,)."""
    rewards = raw.clone()
    if s.missing_eos_penalty is not None:
        rewards = rewards - s.missing_eos_penalty * no_eos.float()
    if s.overlong_buffer and lengths is not None:
        rewards = rewards + overlong_penalty(lengths, s.max_new_tokens, s.overlong_buffer, s.overlong_penalty)
    if s.reward_norm:
        if update:
            stats.update(rewards.tolist())
        rewards = (rewards - stats.mean) / stats.std
    if s.reward_clip is not None:
        rewards = rewards.clamp(-s.reward_clip, s.reward_clip)
    return rewards


def shape_dense_rewards(tokens: Tensor, mask: Tensor, no_eos: Tensor, s: OnlineSettings,
                        lengths: Tensor | None = None) -> Tensor:
    """`shape_rewards` for dense rewards (N, L): the sequence-level missing-EOS and overlong
    penalties go on each sample's last token (where a scalar reward sits, so a scalar given as
    dense-at-last-token shapes exactly as the scalar); every other token keeps its reward.
    PPO-max's running normalisation and clipping are defined on one reward per sample and
    are refused (`check_dense_settings`)."""
    check_dense_settings(s, "dense rewards", tuple(tokens.shape))
    shaped = tokens.clone()
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = last_token_index(mask)
    shaped[rows, last] = shape_rewards(tokens[rows, last], no_eos, s, RunningMeanStd(), update=False,
                                       lengths=lengths)
    return torch.where(mask.bool(), shaped, 0.0)


def check_dense_settings(s: OnlineSettings, what: str, shape: tuple[int, ...]) -> None:
    """Dense rewards (`what`, e.g. "reward count_e", of `shape`) with settings defined on one
    reward per sample: a one-line ValueError."""
    for key in ("reward_norm", "reward_clip"):
        if getattr(s, key) not in (None, False):
            raise ValueError(f"{what} gives per-token rewards of shape {shape}, but {key} normalises or clips one "
                             f"reward per sample (PPO-max): unset {key}, or return one number per sample")


def places_dense(s: OnlineSettings) -> bool:
    """Whether the settings' advantage puts dense rewards at their tokens: GAE (ppo, pf_ppo,
    safe_ppo) and the estimators taking `dense_rewards` (reinforce_pp, reinforce_pp_baseline)."""
    return s.objective == "policy_gradient" and (
        s.lagrangian or ADVANTAGE_KINDS[s.advantage] == "critic"
        or "dense_rewards" in inspect.signature(ADVANTAGES[s.advantage]).parameters)


def dense_use(s: OnlineSettings) -> str:
    """How the settings use dense rewards, for the log: at their tokens (`places_dense`), or
    each sample's sum (every other estimator and objective)."""
    if places_dense(s):
        return f"advantage {s.advantage} places them at their tokens (r_t = R_t - beta KL_t)"
    what = f"advantage {s.advantage}" if s.objective == "policy_gradient" else f"objective {s.objective}"
    return (f"{what} takes one reward per sample: each sample's sum of them (the return from its first token; "
            "their placement is not used; ppo and reinforce_pp use it)")


def greedy_baseline(engine, scorer, tokenizer, prompt_ids, prompt_texts, columns, indices, s,
                     pad_id, device, stats) -> Tensor:
    """ReMax: reward of the greedy response to each prompt, post-processed like the samples."""
    sampling = SamplingParams(max_new_tokens=s.max_new_tokens, greedy=True)
    rollout = engine.generate([prompt_ids[i] for i in indices], 1, sampling)
    batch = SequenceBatch.from_rollout(rollout, pad_id).to(device)
    row_columns = {k: [columns[i].get(k) for i in indices] for k in {k for c in columns for k in c}}
    scores, _ = scorer.score(batch, [prompt_texts[i] for i in indices], decode_completions(tokenizer, rollout),
                             row_columns)
    raw = sequence_scores(scores)  # dense rewards: the sum (ReMax's baseline is one number)
    no_eos = torch.tensor([reason != "stop" for reason in rollout.finish_reason])
    return shape_rewards(raw.to(device), no_eos.to(device), s, stats, update=False,
                         lengths=rollout.lengths.to(device))


def compute_advantages(s: OnlineSettings, rewards, group_index, mask, kl_penalty, values, baseline,
                       costs=None, lagrange: float = 0.0, ref_logp=None, seed: int = 0, dense=None):
    """(advantages, returns), (N, L) each; returns only matter with a critic. safe_ppo
    (`lagrangian`): the mix of reward and cost advantages with multiplier `lagrange` and returns
    (N, L, 2) of both critics (`training/online/safe.py`). ma_ppo (`macro_termination`): GAE over
    macro actions cut from `mask` (perplexity: from `ref_logp` (N, L); random: by `seed`),
    broadcast back to their tokens (`training/online/macro.py`). `dense` (N, L): dense rewards
    whose per-sample sums are `rewards`; GAE and the estimators that take `dense_rewards`
    (reinforce_pp) place them at their tokens, the others use `rewards` (`dense_use`)."""
    placed = rewards if dense is None else dense
    if s.lagrangian:
        advantages, returns = lagrangian_advantages(placed, costs, mask, kl_penalty, values, lagrange,
                                                    s.gamma, s.lam)
    elif ADVANTAGE_KINDS[s.advantage] == "critic":
        token_rewards = token_level_rewards(placed, mask, kl_penalty)
        if s.whiten_rewards:  # DR-PO / lm-human-preference-details: r_t / std(r), mean kept
            token_rewards = masked_whiten(token_rewards, mask, shift_mean=False)
        if s.macro_termination == "none":
            advantages, returns = gae(token_rewards, values, mask, gamma=s.gamma, lam=s.lam)
        else:
            spans = macro_spans(s.macro_termination, mask, n=s.macro_n, repeat=s.macro_repeat, ref_logp=ref_logp,
                                seed=seed)
            advantages, returns = macro_gae(token_rewards, values, mask, spans, s.gamma, s.lam, s.macro_value)
    else:
        fn = ADVANTAGES[s.advantage]
        extra = kwargs_for(fn, {"scale_by_std": s.scale_by_std, "gamma": s.gamma, "clip": s.remax_clip,
                                 "baseline_rewards": baseline, "dense_rewards": dense})
        advantages = fn(rewards, group_index, mask, kl_penalty=kl_penalty, **extra)
        returns = advantages
    if s.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    if s.advantage_clip is not None:
        advantages = advantages.clamp(-s.advantage_clip, s.advantage_clip)
    return advantages.detach(), returns.detach()


def uses_group_baseline(s: OnlineSettings) -> bool:
    """Whether learning needs rewards that differ WITHIN a prompt group: a group-baseline
    advantage, online DPO's best-vs-worst pairs, or SFT on each group's best sample."""
    if s.objective == "sft":
        return s.sample_filter in PER_GROUP_FILTERS
    return s.objective == "pairwise" or s.advantage in GROUP_BASELINES


def check_group_baseline(s: OnlineSettings, preset: str, allow: bool) -> None:
    """Before training: a group-baseline advantage with group_size=1 learns nothing (refused
    unless --allow-degenerate, `alignkit.training.run.degenerate.refuse`)."""
    if s.group_size == 1 and s.objective == "policy_gradient" and s.advantage in GROUP_BASELINES:
        refuse(f"{preset}: group_size=1 with advantage {s.advantage!r}, which subtracts the mean reward of "
               "each prompt's group of samples: with one sample per group every advantage is 0 and nothing "
               "is learned; --set group_size=4 (or more) samples each prompt several times", allow)


def no_reward_variance(s: OnlineSettings) -> Condition:
    """The degenerate-step condition of the online loop's rewards for these settings."""
    if uses_group_baseline(s):
        what = ("the rewards did not vary within any prompt group (each prompt's samples scored alike), "
                "so every advantage was 0")
    else:
        what = "every sample got the same reward, so the rewards carried no signal"
    return Condition("no_reward_variance", what,
                     "check that the reward (--reward, --reward-model) scores different completions "
                     "differently, or sample more diverse completions (group_size, temperature)")


def reward_varies(rewards: Tensor, group_index: Tensor, grouped: bool, baseline: Tensor | None = None,
                  dense_values: Tensor | None = None) -> bool:
    """Whether a step's shaped rewards (N,) carry a signal: with `grouped`, some prompt group
    whose rewards are not all equal (exact comparison, as dynamic sampling); otherwise any two
    different values among the rewards and ReMax's greedy `baseline` (N,), or among
    `dense_values` (M,), the dense rewards on every valid token, when the advantage places
    them (`places_dense`)."""
    if rewards.numel() == 0:
        return False
    if dense_values is not None and not grouped and dense_values.numel() and bool(dense_values.max() > dense_values.min()):
        return True
    if not grouped:
        values = rewards if baseline is None else torch.cat([rewards, baseline.to(rewards)])
        return bool(values.max() > values.min())
    groups, inverse = torch.unique(group_index.to(rewards.device), return_inverse=True)
    high = rewards.new_full((len(groups),), -float("inf")).scatter_reduce(0, inverse, rewards, "amax")
    low = rewards.new_full((len(groups),), float("inf")).scatter_reduce(0, inverse, rewards, "amin")
    return bool((high > low).any())


def summary_stats(prefix: str, values: Tensor, mask: Tensor) -> dict[str, float]:
    """mean/std/min/max of `values` over the True entries of `mask`, keyed `prefix/...`."""
    if not bool(mask.any()):
        return {}
    valid = values[mask]
    return {f"{prefix}/mean": valid.mean().item(), f"{prefix}/std": valid.std().item() if valid.numel() > 1 else 0.0,
            f"{prefix}/min": valid.min().item(), f"{prefix}/max": valid.max().item()}


def rank_micro_batches(rows: Tensor, size: int, ranks: Ranks) -> list[tuple[Tensor, float]]:
    """This rank's micro-batches of a minibatch `rows`, as (rows, weight): rows r, r + W, ... in
    pieces of `size`, padded with weight-0 stand-ins (one row) so that every rank runs as many
    forwards and backwards. One process: the minibatch's own pieces, weight 1."""
    if not ranks.distributed:
        return [(piece, 1.0) for piece in chunks(rows, size)]
    shard = distributed.shard_rows(len(rows), ranks)  # the offline trainer's split of a batch
    mine = rows[torch.tensor(shard.positions, device=rows.device)] if shard.weight > 0 else rows[:0]
    pieces = [(piece, 1.0) for piece in chunks(mine, size)] if len(mine) else []
    largest = math.ceil(len(rows) / ranks.world)
    count = 1 if size <= 0 or size >= largest else math.ceil(largest / size)
    return pieces + [(rows[:1], 0.0)] * (count - len(pieces))


# OnlineSettings fields a policy loss may take as keyword arguments (by its signature).
LOSS_SETTINGS = ("eps_low", "eps_high", "clip_ratio_c", "gspo_eps_low", "gspo_eps_high", "cispo_max", "cispo_min",
                 "sapo_tau_pos", "sapo_tau_neg", "cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_coef")


def policy_gradient_update(policy, batch, rows, s, old_logp, ref_logp, advantages, returns,
                            old_values, on_policy, beta, train_policy, tis_weights=None,
                            rollin_mask=None) -> dict[str, float]:
    """Forward/backward over one minibatch (in micro-batches); returns detached metrics.

    Every normaliser (`norm`) counts the whole minibatch, so under torchrun a rank's loss is its
    rows' share of the global loss; times W, as DDP averages gradients over the W ranks.

    `rollin_mask` (N, L), DR-PO's rolled-in tokens: the policy-gradient term is aggregated over
    the other response tokens only (the official sum(pg * ~rollin) / sum(~rollin) for
    token_mean), while the value loss and a KL-in-loss term cover every response token."""
    ranks = distributed.current()
    mask_all = batch.response_mask[rows]
    full_norm = None
    if rollin_mask is not None:
        full_norm = {"num_tokens": mask_all.sum(), "num_seqs": (mask_all.sum(-1) > 0).sum(),
                     "max_len": s.max_new_tokens}
        mask_all = mask_all & ~rollin_mask[rows, : mask_all.shape[1]]
    norm = {"num_tokens": mask_all.sum(), "num_seqs": (mask_all.sum(-1) > 0).sum(), "max_len": s.max_new_tokens}
    loss_fn, aggregate = POLICY_LOSSES[s.policy_loss], AGGREGATIONS[s.aggregation]
    loss_kwargs = kwargs_for(loss_fn, {key: getattr(s, key) for key in LOSS_SETTINGS} | {"mask": None})
    if s.policy_loss == "dual_clip" and s.clip_ratio_c is None:
        loss_kwargs.pop("clip_ratio_c", None)
    sums: dict[str, float] = {}
    pieces = rank_micro_batches(rows, s.micro_batch_size, ranks)
    for index, (micro, weight) in enumerate(pieces):
        with policy.gradient_sync(index == len(pieces) - 1):
            loss, metrics = _micro_batch_loss(policy, batch, micro, s, norm, loss_fn, aggregate, loss_kwargs,
                                              old_logp, ref_logp, advantages, returns, old_values, on_policy,
                                              beta, train_policy, tis_weights, rollin_mask, full_norm)
            (loss * (weight * ranks.world) if ranks.distributed else loss).backward()
        if weight > 0:
            for key, value in metrics.items():
                add(sums, key, value)
    return distributed.sum_over_ranks(sums)


def _micro_batch_loss(policy, batch, micro, s, norm, loss_fn, aggregate, loss_kwargs, old_logp, ref_logp,
                      advantages, returns, old_values, on_policy, beta, train_policy, tis_weights=None,
                      rollin_mask=None, full_norm=None):
    """(loss of micro-batch `micro` as its share of the minibatch loss, its metric shares).
    `tis_weights` (N, L) weight each token's policy-gradient term (not the KL term).
    `rollin_mask` (N, L): tokens left out of the policy-gradient term (`norm` counts the others;
    `full_norm` every response token, for the value loss and a KL-in-loss term)."""
    sums: dict[str, float] = {}
    sub = batch.select(micro)
    mask, width = sub.response_mask, sub.response_mask.shape[1]
    full_mask = mask
    if rollin_mask is not None:
        mask = mask & ~rollin_mask[micro, :width]  # the tokens the policy generated itself
    logp, entropy, values = policy.forward(sub, with_entropy=s.log_entropy)
    old = logp.detach() if on_policy else old_logp[micro, :width]
    if "mask" in loss_kwargs:  # a loss that reads the tokens' mask (gspo, clip_cov, kl_cov)
        loss_kwargs = {**loss_kwargs, "mask": mask}
    per_token, clipped = loss_fn(logp, old, advantages[micro, :width], **loss_kwargs)
    if tis_weights is not None:
        per_token = per_token * tis_weights[micro, :width]
    kl_loss = None
    if s.kl_in == "loss" and ref_logp is not None and beta > 0:
        kl_term = beta * capped(KL[s.kl_estimator](logp, ref_logp[micro, :width]), s.kl_cap)
        if rollin_mask is None:
            per_token = per_token + kl_term
        else:  # the KL covers the rolled-in tokens too
            kl_loss = aggregate(kl_term, full_mask, **full_norm)
    policy_loss = aggregate(per_token, mask, **norm)
    if kl_loss is not None:
        policy_loss = policy_loss + kl_loss
    tokens = mask.sum()
    share = tokens / norm["num_tokens"].clamp(min=1)
    if s.entropy_coef > 0:  # minus coef x the minibatch's mean token entropy (this micro-batch's share)
        policy_loss = policy_loss - s.entropy_coef * torch.where(mask, entropy, 0.0).sum() / norm["num_tokens"].clamp(min=1)
    loss = policy_loss if train_policy else policy_loss * 0.0
    if values is not None:
        value_norm = norm if full_norm is None else full_norm
        value_loss, explained = clipped_value_loss(values, old_values[micro, :width], returns[micro, :width],
                                                   full_mask, s.cliprange_value, value_norm["num_tokens"])
        loss = loss + s.vf_coef * value_loss
        add(sums, "value_loss", value_loss.item())
        add(sums, "explained_variance", explained * share.item())
    add(sums, "loss", loss.item())
    add(sums, "policy_loss", policy_loss.item())
    add(sums, "clip_ratio", (masked_mean(clipped.float(), mask) * share).item())
    add(sums, "entropy", (masked_mean(entropy.detach(), mask) * share).item())
    ratio = torch.exp(logp.detach() - old)
    add(sums, "ratio/mean", (masked_mean(ratio, mask) * share).item())
    if ref_logp is not None:
        add(sums, "kl/policy_token_mean", (masked_mean(logp.detach() - ref_logp[micro, :width], mask)
                                            * share).item())
    return loss, sums


def add(sums: dict[str, float], key: str, value: float) -> None:
    """sums[key] += value (from 0)."""
    sums[key] = sums.get(key, 0.0) + float(value)


def clipped_value_loss(values, old_values, returns, mask, clip, num_tokens) -> tuple[Tensor, float]:
    """0.5 max((V - G)^2, (clip(V, V_old +- eps) - G)^2), summed over the micro-batch's tokens and
    divided by the minibatch's token count; also the explained variance 1 - Var(G - V) / Var(G)."""
    if values.dim() == 3:  # the reward and cost critics of safe_ppo: the sum of their losses
        parts = [clipped_value_loss(values[..., k], old_values[..., k], returns[..., k], mask, clip, num_tokens)
                 for k in range(values.shape[-1])]
        return sum(part[0] for part in parts), parts[0][1]
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    loss = torch.where(mask, per_token, 0.0).sum() / num_tokens.clamp(min=1)
    with torch.no_grad():
        target, residual = returns[mask], (returns - values)[mask]
        explained = 1.0 - (residual.var(unbiased=False) / target.var(unbiased=False).clamp(min=1e-8)).item()
    return loss, explained


def best_worst_pairs(rewards: Tensor, group_index: Tensor) -> Tensor:
    """(P, 2) rows (best, worst) of each prompt group; ties (no preference) are dropped."""
    pairs = []
    for group in torch.unique(group_index).tolist():
        members = (group_index == group).nonzero().squeeze(-1)
        scores = rewards[members]
        best, worst = members[scores.argmax()], members[scores.argmin()]
        if rewards[best] > rewards[worst]:
            pairs.append(torch.stack([best, worst]))
    return torch.stack(pairs) if pairs else torch.zeros((0, 2), dtype=torch.long, device=rewards.device)


def branch_pairs(group_index: Tensor) -> Tensor:
    """(P, 2) rows (first, second) of each two-row group: REFUEL's two continuations, ties kept."""
    rows = torch.argsort(group_index, stable=True)
    return rows.view(-1, 2)


def pairwise_update(policy, batch, pairs, ref_logp, s, old_logp=None, rewards=None) -> dict[str, float]:
    """Online DPO: a PAIRWISE loss on (best, worst) samples, live reference log-probs. INPO
    (pairwise_loss=inpo, `objectives/nash.py`): the regression on h, pi_t's log-probs being
    `old_logp` (N, L), those of the policy that sampled the pairs. REFUEL (refuel,
    `objectives/rebel.py`): the regression of the rewards' (N,) difference on the log-ratios to
    pi_t, over each branch's own tokens."""
    chosen, rejected = pairs[:, 0], pairs[:, 1]
    rows = torch.cat([chosen, rejected])
    sub = batch.select(rows)
    logp, entropy, _ = policy.forward(sub, with_entropy=s.log_entropy)
    mask = sub.response_mask
    sums, counts = torch.where(mask, logp, 0.0).sum(-1), mask.sum(-1).float()
    ref = torch.where(mask, ref_logp[rows, : mask.shape[1]], 0.0).sum(-1) if ref_logp is not None else None
    half = len(chosen)
    logps = PairLogps(chosen=sums[:half], rejected=sums[half:], chosen_tokens=counts[:half],
                      rejected_tokens=counts[half:], ref_chosen=None if ref is None else ref[:half],
                      ref_rejected=None if ref is None else ref[half:])
    metrics: dict[str, float] = {}
    if s.pairwise_loss == "refuel":
        prev = torch.where(mask, old_logp[rows, : mask.shape[1]], 0.0).sum(-1)
        delta = sums - prev  # l_theta: summed log-ratio to the sampling policy
        loss = rebel_loss(delta[:half], delta[half:], rewards[chosen], rewards[rejected], s.refuel_eta).mean()
        metrics["refuel/sign_align"] = ((delta[:half] - delta[half:]).detach().sign()
                                        == (rewards[chosen] - rewards[rejected]).sign()).float().mean().item()
    elif s.pairwise_loss == "inpo":
        prev = torch.where(mask, old_logp[rows, : mask.shape[1]], 0.0).sum(-1)
        args = (sums[:half], sums[half:], ref[:half], ref[half:], prev[:half], prev[half:], s.inpo_eta, inpo_tau(s))
        loss = inpo_loss(*args).mean()
        metrics["inpo/h"] = inpo_h(*args).mean().item()
    else:
        fn = PAIRWISE[s.pairwise_loss]
        hparams = kwargs_for(fn, {"beta": s.beta, "label_smoothing": s.label_smoothing})
        loss = fn(logps, **hparams).mean()
    loss.backward()
    metrics.update({"loss": loss.item(), "entropy": masked_mean(entropy.detach(), mask).item(), "pairs": float(half)})
    if ref is not None:
        margin = s.beta * ((sums[:half] - ref[:half]) - (sums[half:] - ref[half:])).detach()
        metrics.update({"rewards/margins": margin.mean().item(),
                        "rewards/accuracies": (margin > 0).float().mean().item()})
    return metrics


def kl_prior(ref_dist: Tensor, log_dist: Tensor) -> Tensor:
    """SuperHF's KL prior per token: KL(pi_ref || pi_theta) over the whole vocabulary,

        KL_t = sum_v pi_ref(v | s_t) (log pi_ref(v | s_t) - log pi_theta(v | s_t)),

    clamped at 0 (the paper's max(0, KL), here per token: each KL_t >= 0 up to rounding), from
    (..., V) log softmaxes -> (...). The reference code: KLDivLoss(log pi_theta, log pi_ref,
    log_target=True) on generated positions, the LoRA adapter off for the reference."""
    return (ref_dist.exp() * (ref_dist - log_dist)).sum(-1).clamp(min=0)


def generalized_jsd(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024, eq. 1; TRL's
    generalized_jsd_loss) per position, from (..., V) log softmaxes -> (...):

        M = beta pi_T + (1 - beta) pi_S ;  JSD_beta = beta KL(pi_T || M) + (1 - beta) KL(pi_S || M),
    with the limits beta = 0: KL(pi_T || pi_S) and beta = 1: KL(pi_S || pi_T)."""
    if beta == 0:
        return (teacher.exp() * (teacher - student)).sum(-1)
    if beta == 1:
        return (student.exp() * (student - teacher)).sum(-1)
    mixture = torch.logaddexp(student + math.log1p(-beta), teacher + math.log(beta))
    return (beta * (teacher.exp() * (teacher - mixture)).sum(-1)
            + (1 - beta) * (student.exp() * (student - mixture)).sum(-1))


def sft_update(policy, batch, rows, s, ref_dist, sample_weights: Tensor | None = None) -> dict[str, float]:
    """The supervised objectives on the step's (kept) samples, aggregated like a policy loss
    (token_mean: the mean over the minibatch's tokens).

    sft (RAFT / SuperHF): L = aggregate(-log pi_theta(y_t | s_t)) + beta x sum_t KL_t / tokens,
    KL_t the KL prior (`kl_prior`), `ref_dist` (N, L, V) the reference's log softmax (None when
    beta = 0). distill (GKD, on-policy): L = aggregate(JSD_beta(pi_T, pi_theta)_t), `ref_dist`
    the teacher's log softmax (`generalized_jsd`, jsd_beta). Normalisers count the whole
    minibatch, as `policy_gradient_update`. `sample_weights` (N,) weigh each sample's NLL
    (cgpo_crraft: CRRAFT's -r~ log pi of the best sample; 0 drops an infeasible one)."""
    ranks = distributed.current()
    mask_all = batch.response_mask[rows]
    norm = {"num_tokens": mask_all.sum(), "num_seqs": (mask_all.sum(-1) > 0).sum(), "max_len": s.max_new_tokens}
    aggregate, tokens_all = AGGREGATIONS[s.aggregation], norm["num_tokens"].clamp(min=1)
    jsd = s.objective == "distill"
    with_prior = ref_dist is not None and (s.beta > 0 or jsd)
    sums: dict[str, float] = {}
    pieces = rank_micro_batches(rows, s.micro_batch_size, ranks)
    for index, (micro, weight) in enumerate(pieces):
        with policy.gradient_sync(index == len(pieces) - 1):
            sub = batch.select(micro)
            mask, width = sub.response_mask, sub.response_mask.shape[1]
            if with_prior:
                logp, entropy, log_dist = policy.forward(sub, with_entropy=True, distributions=True)
                target = ref_dist[micro, :width]
            else:
                logp, entropy, _ = policy.forward(sub, with_entropy=s.log_entropy)
            token_nll = -logp if sample_weights is None else -logp * sample_weights[micro].to(logp).unsqueeze(-1)
            nll = aggregate(token_nll, mask, **norm)
            if jsd:
                kl = aggregate(generalized_jsd(log_dist, target, s.jsd_beta), mask, **norm)
                loss = kl
            else:
                kl = (torch.where(mask, kl_prior(target, log_dist), 0.0).sum() / tokens_all if with_prior
                      else logp.new_zeros(()))
                loss = nll + s.beta * kl
            (loss * (weight * ranks.world) if ranks.distributed else loss).backward()
        if weight > 0:
            share = (mask.sum() / tokens_all).item()
            for key, value in {"loss": loss.item(), "nll": nll.item(), ("jsd" if jsd else "kl_prior"): kl.item(),
                               "entropy": masked_mean(entropy.detach(), mask).item() * share}.items():
                add(sums, key, value)
    return distributed.sum_over_ranks(sums)
