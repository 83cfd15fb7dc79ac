"""The token ids of a conversation, built turn by turn with the tokenizer's chat template.

A multi-turn rollout is one token sequence: the prompt (the first messages rendered with
`add_generation_prompt=True`), then the policy's turn exactly as sampled, then the tokens the
template writes for the environment's replies up to the next generation prompt, then the
policy's next turn, and so on. The policy's tokens are kept as sampled (never re-tokenised),
so the sequence is exactly what the policy conditioned on; the environment's tokens are the
template's own text between two generation prompts:

    before   = render(messages + [assistant])                           (no generation prompt)
    after    = render(messages + [assistant] + replies, add_generation_prompt=True)
    env text = closing + after[len(before):]

`closing` is what the template writes after an assistant turn's content ("<|im_end|>\\n" for
ChatML, "<|eot_id|>" for Llama 3), less the part the policy already generated (its stop token):
it is probed once per tokenizer by rendering an assistant turn with a marker content. The
template must render a conversation as an extension of its rendering of every prefix
(`after` starts with `before`); one that rewrites earlier turns (e.g. dropping the reasoning of
past turns) is refused with a clear error, since no single token sequence could then be both
what the policy saw and what the template renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignkit.agents.protocol import Message

PROBE = "\u2063alignkit-probe\u2063"
"""Marker content used to find the template's closing of an assistant turn."""


class TemplateError(ValueError):
    """The chat template cannot render a multi-turn conversation as one growing sequence."""


def render(tokenizer: Any, messages: list[Message], *, tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> str:
    """The chat template's text of `messages` (with `tools` schemas when given)."""
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered template text (its special tokens are written in the text)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def assistant_closing(tokenizer: Any) -> str:
    """What the template writes after an assistant turn's content, up to the next message."""
    head = [{"role": "user", "content": "hi"}]
    opened = render(tokenizer, head, add_generation_prompt=True)
    closed = render(tokenizer, [*head, {"role": "assistant", "content": PROBE}])
    if not closed.startswith(opened) or PROBE not in closed[len(opened):]:
        raise TemplateError("the chat template does not render an assistant turn after its generation prompt; "
                            "multi-turn rollouts need a template with add_generation_prompt")
    return closed[len(opened):].split(PROBE, 1)[1]


def pending_closing(closing: str, generated: str) -> str:
    """The part of `closing` still to write after the policy's turn `generated` (decoded with
    its special tokens): `closing` less its longest prefix that `generated` ends with.

    >>> pending_closing("<|im_end|>\\n", "4<|im_end|>")
    '\\n'
    """
    for cut in range(len(closing), 0, -1):
        if generated.endswith(closing[:cut]):
            return closing[cut:]
    return closing


@dataclass
class Conversation:
    """One conversation's messages and token ids (prompt, then the response side).

    `response_ids[t]` is the t-th token after the prompt; `env[t]` is True when a tool or the
    environment wrote it (template text of their replies), False when the policy sampled it;
    `logprobs[t]` the engine's log-prob of a policy token (0 on the environment's).
    """

    messages: list[Message]
    prompt_ids: list[int]
    tools: list[dict] | None = None
    response_ids: list[int] = field(default_factory=list)
    env: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    """Response position of each policy turn's last token."""
    last_turn: list[int] = field(default_factory=list)
    """The token ids of the policy's last turn."""

    @classmethod
    def start(cls, tokenizer: Any, messages: list[Message], tools: list[dict] | None = None) -> Conversation:
        text = render(tokenizer, messages, tools=tools, add_generation_prompt=True)
        return cls([dict(m) for m in messages], encode(tokenizer, text), tools)

    @property
    def ids(self) -> list[int]:
        """The whole sequence so far: what the policy conditions its next turn on."""
        return self.prompt_ids + self.response_ids

    def add_policy_turn(self, token_ids: list[int], logprobs: list[float], message: Message) -> None:
        """Append the policy's sampled turn (its tokens as sampled) and its parsed message."""
        if not token_ids:
            raise ValueError("a policy turn has at least one token")
        self.response_ids += token_ids
        self.env += [False] * len(token_ids)
        self.logprobs += list(logprobs)
        self.turn_ends.append(len(self.response_ids) - 1)
        self.last_turn = list(token_ids)
        self.messages.append(message)

    def env_tokens(self, tokenizer: Any, replies: list[Message], closing: str) -> list[int]:
        """Token ids of the template's text for `replies` after the last policy turn, through
        the next generation prompt (see the module docstring)."""
        before = render(tokenizer, self.messages, tools=self.tools)
        after = render(tokenizer, [*self.messages, *replies], tools=self.tools, add_generation_prompt=True)
        if not after.startswith(before):
            raise TemplateError("the chat template re-renders earlier turns when a message is added (its text "
                                "for the conversation does not extend its text for the turns before); "
                                "multi-turn rollouts need a template whose rendering only grows")
        generated = tokenizer.decode(self.last_turn, skip_special_tokens=False)
        return encode(tokenizer, pending_closing(closing, generated) + after[len(before):])

    def add_replies(self, tokenizer: Any, replies: list[Message], closing: str) -> int:
        """Append the environment's replies (messages and template tokens); returns the number
        of tokens added."""
        ids = self.env_tokens(tokenizer, replies, closing)
        self.response_ids += ids
        self.env += [True] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.messages += [dict(m) for m in replies]
        return len(ids)
