"""A simulated user: an environment whose replies a language model writes (REFUEL's setting,
`--user-model DIR` or `--user-model policy`).

The conversation is shown to the user model with the roles swapped (its "assistant" is the
user, its "user" the policy) under a system prompt that asks for the user's next message:

    [system: USER_SYSTEM (+ the row's `user_goal`)] + swap(conversation)  ->  the user's turn

The reward is not the simulator's: a --reward or --reward-model scores the finished dialogue
(REFUEL scores whole dialogues with a reward model); the episode lasts `max_turns` policy
turns. The user's sampling is seeded by the run's seed and the conversation so far, so a
resumed run, or two branches that reached the same state, get the same user reply. The
system prompt is our choice (the paper prompts Llama-3-8B-Instruct to act as the human;
its exact prompt is not reproduced here).
"""

from __future__ import annotations

import copy
import threading
import zlib
from typing import Any

from alignkit.agents.protocol import Message, prompt_messages
from alignkit.agents.template import encode, render
from alignkit.rollout import SamplingParams

USER_SYSTEM = ("You are the user in a conversation with an AI assistant. Write only the user's next message: "
               "stay in character, keep pursuing what the user wants, and never answer as the assistant.")
SWAP = {"user": "assistant", "assistant": "user"}


def swapped_view(messages: list[Message], system: str) -> list[Message]:
    """The conversation as the user model sees it: its own turns as "assistant", the policy's
    as "user"; system, tool and other messages dropped (the user does not see tool traffic)."""
    view = [{"role": "system", "content": system}]
    view += [{"role": SWAP[m["role"]], "content": m.get("content") or ""} for m in messages if m["role"] in SWAP]
    return view


class UserSimulator:
    """See the module docstring. `engine` samples the user model (a `RolloutEngine`);
    `tokenizer` is its tokenizer. Calls to the engine are serialised by one lock shared by
    every fork (environment steps run in a thread pool)."""

    def __init__(self, engine: Any, tokenizer: Any, *, max_new_tokens: int = 64, temperature: float = 1.0,
                 seed: int = 0, system: str = USER_SYSTEM) -> None:
        self.engine, self.tokenizer, self.system = engine, tokenizer, system
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.lock = threading.Lock()
        self.goal = ""

    def fork(self) -> UserSimulator:
        """An independent episode state sharing the model, the tokenizer and the lock."""
        return copy.copy(self)

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.goal = str(row.get("user_goal") or "")
        return prompt_messages(row, "--user-model")

    def step(self, messages: list[Message]):
        system = self.system + (f"\nWhat you want: {self.goal}" if self.goal else "")
        view = swapped_view(messages, system)
        ids = encode(self.tokenizer, render(self.tokenizer, view, add_generation_prompt=True))
        text = "".join(m["content"] for m in view)
        sampling = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  seed=(self.seed * 1_000_003 + zlib.crc32(text.encode())) % 2**62)
        with self.lock:
            out = self.engine.generate([ids], 1, sampling)
        reply = self.tokenizer.decode(out.response_ids[0, : int(out.lengths[0])].tolist(), skip_special_tokens=True)
        return {"role": "user", "content": reply.strip() or "..."}, 0.0, False, {"user_tokens": float(out.lengths[0])}
