"""Many conversations advanced together on a rollout engine: a multi-turn rollout.

Each of the B x G conversation slots starts from `env.reset(row)` (its own environment
instance, reused by later episodes of that slot). Then, turn after turn:

1. the engine samples one turn for every active conversation at once (token ids in, token
   ids out; the policy's tokens are kept exactly as sampled);
2. each turn is decoded and parsed for tool calls in the template's format;
3. a turn with tool calls gets the tools' results (every call of every conversation runs in
   one thread pool: a slow tool does not stall the others; an error or a timeout is a tool
   message that starts with "Error:", counted); a turn without is the environment's:
   `env.step(messages)` runs in the thread pool too, under `env_timeout_s`;
4. the replies' template tokens are appended (`template.Conversation`), marked as the
   environment's, and the conversation goes on.

A conversation ends when the environment says done, after `max_turns` policy turns, when
the next turn would not fit the token budget `max_episode_tokens` (finish "budget"), or when
the environment times out (finish "env_timeout", reward 0 for that turn). A turn cut by its
token limit (`max_new_tokens`) without a stop token is still a turn: the template closes it
and the environment answers it, as a chat client would a truncated message
(`turns/truncated_fraction`); the rollout's finish reason is "length" when the LAST turn was
cut (the missing-EOS penalty's case). A finished conversation leaves the batch: the last
tokens of every sequence are the policy's, so `Rollout.lengths - 1` is each row's last policy
token. The reward of a turn is placed at its last token (`turn_ends`); the
episode's return is their sum.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.agents.protocol import (
    EnvironmentError_,
    Message,
    as_step_result,
    check_messages,
    prompt_messages,
)
from alignkit.agents.template import Conversation, assistant_closing
from alignkit.agents.tools import (
    ToolRunner,
    assistant_message,
    detect_tool_format,
    parse_assistant_turn,
    template_supports_tools,
    tool_schemas,
    tools_system_prompt,
)
from alignkit.rollout import Rollout, SamplingParams

TURN_SEED_STRIDE = 15_485_863
"""A prime: round t of a batch of episodes samples with seed (seed + t x this) mod 2^62."""


@dataclass
class EpisodeSettings:
    """How long a conversation may go on (`--set` keys of the online loop of the same names)."""

    max_turns: int = 4
    """Most policy turns per conversation."""
    max_episode_tokens: int = 1024
    """Most tokens after the prompt (the policy's and the environment's together)."""
    env_timeout_s: float = 30.0
    """Seconds an `env.step` may take; past it the episode ends (finish "env_timeout")."""
    tool_timeout_s: float = 10.0
    """Seconds a tool call may take; past it the model gets an error message."""
    env_workers: int = 8
    """Threads running environment steps and tool calls."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_episode_tokens < 2:
            raise ValueError(f"max_episode_tokens must be >= 2, got {self.max_episode_tokens}")
        if not self.env_timeout_s > 0 or not self.tool_timeout_s > 0:
            raise ValueError("env_timeout_s and tool_timeout_s must be > 0")
        if self.env_workers < 1:
            raise ValueError(f"env_workers must be >= 1, got {self.env_workers}")


class PromptEnvironment:
    """The environment of a run with `--tools` and no `--env`: the dataset row's prompt is the
    first user message (a `messages` prompt is used as is); a turn without a tool call is the
    final answer and ends the episode with reward 0 (the run's --reward scores it)."""

    def reset(self, row: dict[str, Any]) -> list[Message]:
        return prompt_messages(row, "--tools")

    def step(self, messages: list[Message]):
        return None, 0.0, True, {}


@dataclass
class Episodes:
    """A batch of finished conversations: the rollout (`Rollout.env_mask` marks the
    environment's tokens), each row's messages, per-turn rewards and where each turn ends."""

    rollout: Rollout
    messages: list[list[Message]]
    turn_rewards: list[list[float]]
    turn_ends: list[list[int]]
    metrics: dict[str, float]

    @property
    def returns(self) -> Tensor:
        """(N,) each episode's return: the sum of its turns' rewards."""
        return torch.tensor([math.fsum(r) for r in self.turn_rewards], dtype=torch.float32)

    def turn_rewards_dense(self) -> Tensor:
        """(N, L) each turn's reward at its last policy token, 0 elsewhere."""
        out = torch.zeros(self.rollout.response_ids.shape, dtype=torch.float32)
        for row, (rewards, ends) in enumerate(zip(self.turn_rewards, self.turn_ends, strict=True)):
            for reward, end in zip(rewards, ends, strict=True):
                out[row, end] += reward
        return out

    def final_answers(self) -> list[str]:
        """The content of each conversation's last assistant message."""
        return [next((m.get("content") or "" for m in reversed(msgs) if m["role"] == "assistant"), "")
                for msgs in self.messages]


@dataclass
class _Slot:
    """One running conversation."""

    env: Any
    row: dict[str, Any]
    conversation: Conversation
    rewards: list[float]
    finish: str = ""
    tool_calls: int = 0
    tool_errors: int = 0
    cut_turns: int = 0
    last_cut: bool = False
    info: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    prefix: int = 0
    """Response tokens shared with a sibling branch (REFUEL's roll-in): not trained."""

    @property
    def turns(self) -> int:
        """Policy turns played so far."""
        return len(self.conversation.turn_ends)


def base_seed(sampling: SamplingParams) -> int:
    """The engine seed of a batch of episodes' first round (drawn when the sampling has none)."""
    return sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())


class EpisodeRunner:
    """Runs batches of episodes (see the module docstring); one per training run.

    `env_factory`: a zero-argument factory (`protocol.load_env`); `tools`: plain functions
    (`tools.load_tools`) offered to the policy through the chat template (or, for a template
    without tool support, described in the system prompt)."""

    def __init__(self, tokenizer: Any, env_factory: Callable[[], Any] | None = None,
                 tools: list[Callable] | None = None, settings: EpisodeSettings | None = None,
                 env_name: str = "--env") -> None:
        self.tokenizer, self.settings = tokenizer, settings or EpisodeSettings()
        self.env_factory = env_factory or PromptEnvironment
        self.env_name = env_name
        self.closing = assistant_closing(tokenizer)
        self.tool_format = detect_tool_format(tokenizer)
        self.tools = list(tools or [])
        self.schemas = tool_schemas(self.tools) if self.tools else None
        self.template_tools = bool(self.schemas) and template_supports_tools(tokenizer)
        self.tool_runner = ToolRunner(self.tools, timeout_s=self.settings.tool_timeout_s,
                                      max_workers=self.settings.env_workers) if self.tools else None
        self.pool = ThreadPoolExecutor(self.settings.env_workers, thread_name_prefix="alignkit-env")
        self.envs: list[Any] = []
        self.envs_checked = False
        self.env_tools = False  # tool turns go to env.step (adopt_env_tools)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.tool_runner is not None:
            self.tool_runner.close()

    def adopt_env_tools(self, env: Any) -> None:
        """An environment with its own tools (`tools()`, e.g. a TRL environment class) offers
        them to the policy; its `step` answers the tool turns (each instance runs its own
        bound methods). Not with --tools: one set of tools per run."""
        self.envs_checked = True
        own = getattr(env, "tools", None)
        tools = list(own()) if callable(own) else []
        if not tools:
            return
        if self.tools:
            raise ValueError(f"{self.env_name} brings its own tools; drop --tools")
        self.schemas, self.env_tools = tool_schemas(tools), True
        self.template_tools = template_supports_tools(self.tokenizer)

    # ---- starting
    def first_messages(self, env: Any, row: dict[str, Any], where: str) -> list[Message]:
        """`env.reset(row)`, checked, with the tools described in the system prompt when the
        chat template cannot take them."""
        messages = check_messages(env.reset(dict(row)), f"{where}: reset")
        if not messages:
            raise EnvironmentError_(f"{where}: reset returned no messages")
        if self.schemas and not self.template_tools:
            described = tools_system_prompt(self.schemas, self.tool_format)
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + described}
            else:
                messages.insert(0, {"role": "system", "content": described})
        return messages

    def slots(self, rows: list[dict[str, Any]], n: int) -> list[_Slot]:
        """B x n conversations, row i's samples at i*n .. i*n + n - 1, each on its own instance."""
        while len(self.envs) < len(rows) * n:
            self.envs.append(self.env_factory())
        if not self.envs_checked:
            self.adopt_env_tools(self.envs[0])
        out = []
        for k in range(len(rows) * n):
            row = rows[k // n]
            where = f"{self.env_name} (row {row.get('__row__', k // n)})"
            messages = self.first_messages(self.envs[k], row, where)
            conversation = Conversation.start(self.tokenizer, messages, self.schemas if self.template_tools else None)
            out.append(_Slot(self.envs[k], row, conversation, []))
        return out

    # ---- running
    def run(self, engine: Any, rows: list[dict[str, Any]], n: int, sampling: SamplingParams) -> Episodes:
        """Episodes for `rows` (dataset rows), `n` per row; `sampling.max_new_tokens` bounds
        each turn and `sampling.seed` (with the round) seeds the engine; a round's j-th active
        conversation draws the noise of sample `sampling.first_sample + j` (a later chunk of
        held-out rows passes its first global sample, so it does not reuse the first's noise)."""
        started = time.perf_counter()
        slots = self.slots(rows, n)
        self.advance(engine, slots, sampling, base_seed(sampling))
        return self.episodes(slots, n, time.perf_counter() - started)

    def advance(self, engine: Any, slots: list[_Slot], sampling: SamplingParams, seed: int,
                until: list[int] | None = None, before_turn: Callable[[list[int]], None] | None = None) -> None:
        """Play rounds of turns until every slot has finished or, with `until`, slot k has played
        `until[k]` turns (it pauses, ready for its next turn). `before_turn(active)` is called
        before each round with the slots about to play."""
        round_ = 0
        while True:
            active = [k for k, slot in enumerate(slots)
                      if not slot.finish and (until is None or slot.turns < until[k])]
            if not active:
                return
            if before_turn is not None:
                before_turn(active)
            self.play_round(engine, slots, active, sampling, (seed + round_ * TURN_SEED_STRIDE) % 2**62)
            round_ += 1

    def play_round(self, engine: Any, slots: list[_Slot], active: list[int], sampling: SamplingParams,
                   seed: int) -> None:
        """One turn of every active slot: generate, parse, tools or environment, replies."""
        budget = self.settings.max_episode_tokens
        room = min(sampling.max_new_tokens, min(budget - len(slots[k].conversation.response_ids) for k in active))
        turn_sampling = dataclasses.replace(sampling, max_new_tokens=max(room, 1), seed=seed,
                                            first_sample=sampling.first_sample)
        generated = engine.generate([slots[k].conversation.ids for k in active], 1, turn_sampling)
        lengths = generated.lengths.tolist()
        replies: dict[int, list[Message]] = {}
        tool_batches: list[tuple[int, list]] = []
        stepping: list[int] = []
        for j, k in enumerate(active):
            slot, count = slots[k], lengths[j]
            ids = generated.response_ids[j, :count].tolist()
            logps = generated.response_logprobs[j, :count].tolist()
            text = self.turn_text(ids, generated.finish_reason[j])
            content, calls = (parse_assistant_turn(text, self.tool_format, self.tokenizer) if self.schemas
                              else (text, []))
            # a template that renders tool calls gets them structured; one that cannot keeps the call text
            slot.conversation.add_policy_turn(ids, logps, assistant_message(content if self.template_tools
                                                                            else text, calls))
            slot.rewards.append(0.0)
            slot.last_cut = generated.finish_reason[j] != "stop"
            slot.cut_turns += slot.last_cut
            slot.tool_calls += len(calls)
            if calls and not self.env_tools:
                tool_batches.append((k, calls))
            else:  # the environment's turn (an environment with its own tools answers their calls)
                stepping.append(k)
        if tool_batches:
            results = self.tool_runner.run_many([calls for _, calls in tool_batches])
            for (k, _), (messages, stats) in zip(tool_batches, results, strict=True):
                replies[k] = messages
                slots[k].tool_errors += stats.errors
        self.step_environments(slots, stepping, replies)
        for k in active:
            slot = slots[k]
            if slot.finish:
                continue
            if slot.turns >= self.settings.max_turns:
                slot.finish = "turns"
                continue
            slot.conversation.add_replies(self.tokenizer, replies[k], self.closing)
            if len(slot.conversation.response_ids) >= budget:  # no room for another turn
                self.trim_to_last_turn(slot)
                slot.finish = "budget"

    def turn_text(self, ids: list[int], finish: str) -> str:
        """A policy turn's text: its tokens less the stop token, special tokens kept (tool-call
        markers such as <|python_tag|> or [TOOL_CALLS] are special tokens)."""
        if finish == "stop" and ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def step_environments(self, slots: list[_Slot], stepping: list[int], replies: dict[int, list[Message]]) -> None:
        """`env.step` of every conversation in `stepping`, in the thread pool, each under the
        timeout; sets replies, rewards and finish."""
        futures = {k: self.pool.submit(slots[k].env.step, [dict(m) for m in slots[k].conversation.messages])
                   for k in stepping}
        deadline = time.monotonic() + self.settings.env_timeout_s
        for k, future in futures.items():
            slot = slots[k]
            where = f"{self.env_name} (row {slot.row.get('__row__', '?')})"
            try:
                out = future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except FutureTimeout:
                slot.finish = "env_timeout"
                continue
            except Exception as err:
                raise EnvironmentError_(f"{where}: step raised {type(err).__name__}: {err}") from err
            result = as_step_result(out, f"{where}: step")
            slot.rewards[-1] += result.reward
            for key, value in result.info.items():
                slot.info.setdefault(key, []).append(value)
            if result.done:
                slot.finish = "done"
            else:
                replies[k] = result.reply
                slot.tool_errors += sum(m["role"] == "tool" and m.get("content", "").startswith("Error:")
                                        for m in result.reply)

    @staticmethod
    def trim_to_last_turn(slot: _Slot) -> None:
        """Drop the environment tokens after the last policy turn (no turn follows them)."""
        conversation = slot.conversation
        keep = conversation.turn_ends[-1] + 1
        del conversation.response_ids[keep:], conversation.env[keep:], conversation.logprobs[keep:]

    def episodes(self, slots: list[_Slot], n: int, seconds: float) -> Episodes:
        """The finished slots as a padded `Rollout` (+ messages, rewards, metrics)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(slot.conversation.response_ids) for slot in slots)
        rows = len(slots)
        ids = torch.full((rows, width), pad, dtype=torch.long)
        logps = torch.zeros((rows, width), dtype=torch.float32)
        mask = torch.zeros((rows, width), dtype=torch.bool)
        env = torch.zeros((rows, width), dtype=torch.bool)
        for r, slot in enumerate(slots):
            c = slot.conversation
            length = len(c.response_ids)
            ids[r, :length] = torch.tensor(c.response_ids, dtype=torch.long)
            logps[r, :length] = torch.tensor(c.logprobs, dtype=torch.float32)
            mask[r, :length] = True
            env[r, :length] = torch.tensor(c.env, dtype=torch.bool)
            env[r, : slot.prefix] = True  # a branch's shared roll-in is context, as the environment's tokens
        # "length": the last policy turn was cut by its token limit (the missing-EOS penalty's case)
        finish = ["length" if slot.last_cut else "stop" for slot in slots]
        group = torch.arange(rows) // n
        rollout = Rollout([s.conversation.prompt_ids for s in slots], ids, logps, mask, finish, group,
                          extras={"episode_finish": [s.finish for s in slots]}, env_mask=env)
        return Episodes(rollout, [s.conversation.messages for s in slots], [s.rewards for s in slots],
                        [list(s.conversation.turn_ends) for s in slots], episode_metrics(slots, seconds))


def episode_metrics(slots: list[_Slot], seconds: float) -> dict[str, float]:
    """turns/mean, tools/calls_per_episode, tools/errors (per step), episode/length (tokens
    after the prompt), episode/policy_tokens, episode/return, the finish fractions and the
    environment's numeric info as env/KEY."""
    count = len(slots)
    out = {
        "turns/mean": sum(len(s.conversation.turn_ends) for s in slots) / count,
        "tools/calls_per_episode": sum(s.tool_calls for s in slots) / count,
        "tools/errors": float(sum(s.tool_errors for s in slots)),
        "episode/length": sum(len(s.conversation.response_ids) for s in slots) / count,
        "episode/policy_tokens": sum(c.env.count(False) for c in (s.conversation for s in slots)) / count,
        "episode/return": sum(math.fsum(s.rewards) for s in slots) / count,
        "time/episodes_s": seconds,
    }
    turns = sum(len(s.conversation.turn_ends) for s in slots)
    out["turns/truncated_fraction"] = sum(s.cut_turns for s in slots) / max(turns, 1)
    for finish in ("done", "turns", "budget", "env_timeout"):
        out[f"episode/finish_{finish}"] = sum(s.finish == finish for s in slots) / count
    keys = sorted({key for s in slots for key in s.info})
    for key in keys:
        values = [v for s in slots for v in s.info.get(key, [])]
        out[f"env/{key}"] = sum(values) / len(values)
    return out
