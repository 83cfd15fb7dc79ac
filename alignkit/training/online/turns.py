"""The online loop over multi-turn rollouts (`--env`, `--tools`: `alignkit.agents`).

A conversation is one sequence; its policy tokens have holes where the environment spoke.
Every token-level estimator (GAE, REINFORCE++'s discounted returns, macro actions) runs over
the policy's tokens only, as if the environment's were not there:

    compact:  row r's policy tokens, in order, left-aligned:  x_c[r, j] = x[r, idx[r, j]]
    estimate: advantages_c = estimator(x_c, mask_c)            (mask_c a prefix mask)
    scatter:  advantages[r, idx[r, j]] = advantages_c[r, j],   0 on the environment's tokens

so the bootstrap V(s_{t+1}) of a turn's last token is the value at the first token of the
policy's next turn (GAE over the policy's tokens, per-turn rewards at each turn's end), and an
episode's return is the sum of its turns' rewards (GRPO/RLOO: one return per episode).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from alignkit.agents.episodes import EpisodeRunner, EpisodeSettings
from alignkit.agents.protocol import load_env
from alignkit.agents.tools import load_tools
from alignkit.training.online.distributed_rollout import rank_local


def has_holes(mask: Tensor) -> bool:
    """Whether some row of (N, L) `mask` has a False before a True (not a prefix mask)."""
    lengths = mask.sum(-1, keepdim=True)
    prefix = torch.arange(mask.shape[-1], device=mask.device).unsqueeze(0) < lengths
    return bool((prefix != mask.bool()).any())


def compact_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(idx, mask_c), (N, L_c) each with L_c = the most True in a row: idx[r, j] is the column of
    row r's j-th True (any column past its count), mask_c[r, j] = j < count_r."""
    counts = mask.sum(-1)
    width = max(int(counts.max().item()) if mask.numel() else 0, 1)
    order = torch.argsort((~mask.bool()).to(torch.int8), dim=1, stable=True)  # Trues first, in order
    idx = order[:, :width]
    mask_c = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return idx, mask_c


def gather_tokens(x: Tensor | None, idx: Tensor) -> Tensor | None:
    """(N, L, ...) -> (N, L_c, ...) along the token dimension."""
    if x is None:
        return None
    index = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(1, index)


def scatter_tokens(x_c: Tensor, idx: Tensor, mask_c: Tensor, width: int) -> Tensor:
    """The inverse of `gather_tokens` on the compacted True positions; 0 elsewhere."""
    shape = (x_c.shape[0], width, *x_c.shape[2:])
    keep = mask_c.view(*mask_c.shape, *([1] * (x_c.dim() - 2)))
    index = idx.view(*idx.shape, *([1] * (x_c.dim() - 2))).expand(*idx.shape, *x_c.shape[2:])
    return x_c.new_zeros(shape).scatter(1, index, torch.where(keep, x_c, 0))


def over_policy_tokens(estimate, mask: Tensor, tokens: dict[str, Tensor | None], **fixed: Any):
    """`estimate(mask=..., **tokens, **fixed) -> (advantages, returns)` over the policy's tokens
    of `mask` (see the module docstring); `tokens` are the (N, L, ...) inputs to compact. A
    prefix mask (single-turn) calls `estimate` unchanged."""
    if not has_holes(mask):
        return estimate(mask=mask, **tokens, **fixed)
    idx, mask_c = compact_index(mask)
    advantages, returns = estimate(mask=mask_c, **{k: gather_tokens(v, idx) for k, v in tokens.items()}, **fixed)
    width = mask.shape[1]
    return scatter_tokens(advantages, idx, mask_c, width), scatter_tokens(returns, idx, mask_c, width)


def episode_runner(config, s, tokenizer, engine=None) -> EpisodeRunner | None:
    """The run's episode runner when it has `--env`, `--tools` or `--user-model`; else None
    (single-turn). `engine` is the policy's rollout engine (`--user-model policy` samples it)."""
    if config.env is None and config.tools is None and config.user_model is None:
        if s.objective == "pairwise" and s.pairwise_loss == "refuel":
            raise ValueError(f"{config.algorithm} is multi-turn: give the other side of the dialogue, --user-model "
                             "DIR (or policy) for a simulated user, or --env module:Factory")
        return None
    if config.chat_template is False:  # None (the default) is fine: a conversation is always templated
        raise ValueError("--env/--tools run conversations through the chat template; drop --no-chat-template")
    if config.env is not None and config.user_model is not None:
        raise ValueError("--env and --user-model both answer the policy: give one")
    factory = load_env(config.env) if config.env is not None else None
    if config.user_model is not None:
        factory = user_simulator(config, s, tokenizer, engine)
    tools = load_tools(config.tools) if config.tools is not None else None
    settings = EpisodeSettings(max_turns=s.max_turns, max_episode_tokens=s.max_episode_tokens,
                               env_timeout_s=s.env_timeout_s, tool_timeout_s=s.tool_timeout_s,
                               env_workers=s.env_workers)
    return EpisodeRunner(tokenizer, factory, tools, settings, env_name=f"--env {config.env}" if config.env else
                         "--tools")


SINGLE_TURN_ONLY = {
    "reset_prob": "drpo's dataset resets roll in a single response",
    "dpa": "dpa writes its direction into a single-turn prompt",
    "mixture_coef": "nash_md samples its opponent as one completion",
}


def check_multi_turn_settings(config, s) -> None:
    """Before anything loads: refuse the settings that sample single completions beside (or
    instead of) a multi-turn run's episodes, which would otherwise be skipped without a word."""
    if config.env is None and config.tools is None and config.user_model is None:
        return
    preset = config.algorithm
    active = {"reset_prob": s.reset_prob > 0, "dpa": s.dpa, "mixture_coef": s.mixture_coef is not None}
    for key, on in active.items():
        if on:
            raise ValueError(f"{preset}: {SINGLE_TURN_ONLY[key]}; it does not run with --env/--tools/--user-model")
    if s.objective == "policy_gradient" and s.advantage == "remax":
        raise ValueError(f"{preset}: remax's baseline is a greedy single-turn response; with --env/--tools/"
                         "--user-model use grpo, rloo or ppo")


def user_simulator(config, s, tokenizer, engine):
    """The factory of `--user-model`'s simulated users (one model shared by every instance)."""
    from alignkit.agents.user_sim import UserSimulator

    if config.user_model == "policy":  # under torchrun, each rank samples its users itself (rank_local)
        user_engine, user_tokenizer = rank_local(engine), tokenizer
    else:
        from alignkit.models.loading import load_model
        from alignkit.rollout import HFEngine
        from alignkit.training.online.roles import eos_ids
        from alignkit.training.run import distributed

        device = distributed.default_device(distributed.current(), config.device)
        model, user_tokenizer = load_model(config.user_model, kind="causal_lm", device=device,
                                           trust_remote_code=config.trust_remote_code)
        model.eval().requires_grad_(False)
        user_engine = HFEngine(model, pad_id=user_tokenizer.pad_token_id, eos_ids=eos_ids(user_tokenizer, model))
    shared = UserSimulator(user_engine, user_tokenizer, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                           seed=config.seed)
    return shared.fork
