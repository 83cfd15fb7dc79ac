"""RLHS: a reward that simulates the consequences of a response before the judge scores it.

Liang et al. 2025, "RLHS: Mitigating Misalignment in RLHF with Hindsight Simulation". An
evaluator who judges the immediate response (foresight) must predict its downstream outcome,
and that prediction is what the policy learns to sway: sycophancy and deception pay (Goodhart).
RLHS decouples the two: a simulator first rolls plausible consequences forward (the user acts
on the advice; what happens), and the evaluator then judges the hindsight outcome. The paper's
result holds even when the outcomes are sampled from the AI's own world model.

Pinned by the paper: (1) the simulator sees the interaction (and, in the paper's settings, the
state the user cannot see, e.g. the true product features; our `facts_column`), and produces an
outcome; (2) the evaluator sees the interaction *and* the simulated outcome, then gives
feedback; (3) the hindsight score replaces the foresight one as the reward of PPO (online) or
as the preference label of DPO pairs (offline). Our choices: the templates below, `horizon`
tokens of free-text continuation by a causal LM, the mean over `n_simulations`, and the two
judge kinds. For each (prompt x, response y), with conversation c = "User: x\\nAssistant: y":

1. simulate: s_j ~ simulator( template(c, x, y, facts) ), j = 1..n, at most `horizon` tokens;
2. hindsight text h_j = y + outcome_prefix + s_j (outcome_prefix "\\n\\nThe user acted on the
   assistant's answer. What happened next:", also the end of the default template, so the
   judge reads the consequence exactly where the simulator wrote it);
3. judge:
   - a reward spec J (`vader`, `rm:DIR`, `file.py:fn`): score_j = J(x, h_j), the judge called
     with the prompts and the hindsight texts as completions (dataset columns repeated);
   - `yes_no`: the simulator reads render(x, h_j) + "\\n\\nQuestion: Was the user satisfied
     with the outcome? Answer yes or no.\\nAnswer:" and
         score_j = p(yes) / (p(yes) + p(no)) = sigmoid(z_yes - z_no),
     z the next-token logits (one forward pass), `yes`/`no` single tokens (" yes", " no");
4. reward r(x, y) = (1/n) sum_j score_j.

The foresight score (`foresight: true`) is the same judge on the bare response: J(x, y), or the
yes/no question "Will the user be satisfied ...?" after render(x, y). Both are logged through
`drain()` as `rlhs/hindsight` and `rlhs/foresight` (the online loop logs `reward/rlhs/...`).

Determinism: with `batch_independent` (default) each row is simulated in its own engine call
seeded with hash(seed, its simulator input), so a row's reward is a function of its own text and
the seed, whatever batch it sits in; otherwise one call per batch seeded with `seed`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.agents.hindsight_config import QUESTION_SUFFIX, HindsightConfig, load_config
from alignkit.models import load_model, position_ids_from_mask
from alignkit.rewards import call_reward, load_reward
from alignkit.rollout import HFEngine, SamplingParams

log = logging.getLogger("alignkit")

ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool"}


def message_text(value: Any) -> str:
    """A completion's text: the string, or the content of a list of assistant messages (TRL's
    conversational completions)."""
    if isinstance(value, list):
        return "".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def render_prompt(prompt: Any) -> str:
    """ "User: PROMPT" for a text prompt; each message of a conversational prompt on its own
    "Role: content" line."""
    if isinstance(prompt, list):
        return "\n".join(f"{ROLE_NAMES.get(m.get('role'), str(m.get('role')).title())}: {m.get('content', '')}"
                         for m in prompt if isinstance(m, dict))
    return f"User: {prompt}"


def render_conversation(prompt: Any, response: str) -> str:
    """`render_prompt(prompt)`, then "Assistant: RESPONSE" on the next line."""
    return f"{render_prompt(prompt)}\nAssistant: {response}"


def row_seed(seed: int, text: str) -> int:
    """A 62-bit seed from (seed, text): sha256, so it is the same in every process."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def single_token(tokenizer: Any, text: str, what: str) -> int:
    """The one token id `text` encodes to; ValueError naming the answer otherwise."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"rlhs {what} answer {text!r} is {len(ids)} tokens of the simulator's tokenizer; "
                         f"the yes/no judge reads one next-token logit: choose a one-token answer")
    return int(ids[0])


def stop_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """Ids that end a simulation: the tokenizer's eos and the generation config's."""
    found = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found.update([generation_eos] if isinstance(generation_eos, int) else (generation_eos or []))
    return tuple(sorted(token for token in found if token is not None))


def repeat_rows(values: Sequence[Any], n: int) -> list[Any]:
    """[a, b] -> [a, a, b, b] for n = 2: one entry per simulation, row-major."""
    return [value for value in values for _ in range(n)]


@torch.no_grad()
def yes_probability(model: Any, rows: list[list[int]], yes_id: int, no_id: int, pad_id: int) -> Tensor:
    """P(yes) after each token row: sigmoid(z_yes - z_no), z = the model's next-token logits
    at the row's last token. Rows are left-padded (positions counted over real tokens) and
    scored in one forward pass. Shapes: B rows -> (B,) float32."""
    width = max(len(row) for row in rows)
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False, **kwargs).logits[:, -1].float()  # (B, V)
    return torch.sigmoid(logits[:, yes_id] - logits[:, no_id])


@dataclass
class HindsightScores:
    """One batch scored: the reward (B,) or (B, K), the foresight score (None unless
    configured), and each row's simulated consequences (B lists of n_simulations texts)."""

    hindsight: Tensor
    foresight: Tensor | None
    consequences: list[list[str]]


class HindsightReward:
    """The RLHS reward, `fn(prompts, completions, **columns) -> Tensor (B,)` (see the module
    docstring). `HindsightReward.from_yaml(path)` or `HindsightReward(HindsightConfig(...))`;
    `model`/`tokenizer` give an already loaded simulator instead of `config.simulator`."""

    def __init__(self, config: HindsightConfig, *, model: Any = None, tokenizer: Any = None,
                 name: str | None = None) -> None:
        self.config = config
        if model is None:
            model, tokenizer = load_model(config.simulator, dtype=config.dtype, device=config.device)
        elif tokenizer is None:
            raise ValueError("HindsightReward: a simulator model needs its tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.stop_ids = stop_ids(tokenizer, model)
        self.engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=self.stop_ids,
                               max_batch_size=config.batch_size)
        self.judge = None if config.yes_no else load_reward(config.judge)
        self.answer_ids = ((single_token(tokenizer, config.yes, "yes"), single_token(tokenizer, config.no, "no"))
                           if config.yes_no else None)
        if self.answer_ids is not None and self.answer_ids[0] == self.answer_ids[1]:
            raise ValueError(f"rlhs yes {config.yes!r} and no {config.no!r} are the same token")
        self.alignkit_reward_name = name or "rlhs"
        self.__name__ = "rlhs"  # the short name a run's metrics use (reward/rlhs)
        self._pending: dict[str, list[Tensor]] = {"rlhs/hindsight": [], "rlhs/foresight": []}
        self._lock = threading.Lock()  # one simulator: reward_workers threads take turns

    @classmethod
    def from_yaml(cls, path: str, *, name: str | None = None) -> HindsightReward:
        """The reward configured by a YAML file (`alignkit.agents.hindsight_config`)."""
        config = load_config(path)
        try:
            return cls(config, name=name or f"rlhs:{path}")
        except ValueError as err:
            message = str(err)
            raise ValueError(message if str(path) in message else f"rlhs config {str(path)!r}: {message}") from err

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        scores = self.score(prompts, completions, **columns)
        with self._lock:
            self._pending["rlhs/hindsight"].append(scores.hindsight.reshape(len(prompts), -1)[:, 0].cpu())
            if scores.foresight is not None:
                self._pending["rlhs/foresight"].append(scores.foresight.reshape(len(prompts), -1)[:, 0].cpu())
        return scores.hindsight

    def drain(self) -> dict[str, Tensor]:
        """The hindsight (and foresight) scores of every call since the last drain, by metric name."""
        with self._lock:
            out = {name: torch.cat(parts) for name, parts in self._pending.items() if parts}
            self._pending = {name: [] for name in self._pending}
        return out

    def score(self, prompts: list[Any], completions: list[Any], **columns: Any) -> HindsightScores:
        """Simulate, judge in hindsight (and in foresight when configured); see the module docstring."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        columns = {key: value for key, value in columns.items() if key != "completion_ids"}  # the response's ids
        responses = [message_text(completion) for completion in completions]
        facts = self._facts(columns, len(prompts))
        with self._lock:
            consequences = self.simulate(prompts, responses, facts)
            n = self.config.n_simulations
            hindsight_texts = [response + self.config.outcome_prefix + consequence
                               for response, row in zip(responses, consequences, strict=True) for consequence in row]
            hindsight = self._judge(repeat_rows(prompts, n), hindsight_texts, repeat_rows(completions, n),
                                    self._repeat_columns(columns, len(prompts), n), self.config.question)
            hindsight = hindsight.reshape(len(prompts), n, -1).mean(1)  # (B, K)
            foresight = None
            if self.config.foresight:
                foresight = self._judge(list(prompts), responses, list(completions), columns,
                                        self.config.foresight_question).reshape(len(prompts), -1)
        squeeze = (lambda t: t.squeeze(-1)) if hindsight.shape[-1] == 1 else (lambda t: t)
        return HindsightScores(squeeze(hindsight), None if foresight is None else squeeze(foresight), consequences)

    def simulation_input(self, prompt: Any, response: str, facts: Any = None) -> str:
        """The text the simulator continues (the template filled in)."""
        return self.config.template.format(
            conversation=render_conversation(prompt, response), response=response,
            prompt=render_prompt(prompt) if isinstance(prompt, list) else str(prompt),
            facts="" if facts is None else str(facts))

    def judge_text(self, prompt: Any, completion: str, question: str) -> str:
        """What the yes/no judge reads: the rendered conversation whose last turn is
        `completion` (the hindsight text, or the bare response), then the question."""
        return render_conversation(prompt, completion) + QUESTION_SUFFIX.format(question=question)

    def simulate(self, prompts: list[Any], responses: list[str], facts: list[Any] | None = None) -> list[list[str]]:
        """n_simulations consequences per (prompt, response): B lists of n texts."""
        config, n = self.config, self.config.n_simulations
        inputs = [self.simulation_input(p, r, None if facts is None else facts[i])
                  for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        ids = self._encode(inputs, config.max_context - config.horizon)
        if config.batch_independent:
            calls = [([i], row_seed(config.seed, text)) for i, text in enumerate(inputs)]
        else:
            calls = [(list(range(len(inputs))), config.seed)]
        out: list[list[str]] = [[] for _ in inputs]
        for rows, seed in calls:
            sampling = SamplingParams(max_new_tokens=config.horizon, temperature=config.temperature,
                                      top_p=config.top_p, seed=seed, stop_token_ids=self.stop_ids)
            rollout = self.engine.generate([ids[row] for row in rows], n, sampling)
            texts = [self.tokenizer.decode(tokens[mask].tolist(), skip_special_tokens=True)
                     for tokens, mask in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu(), strict=True)]
            for k, row in enumerate(rows):
                out[row] = texts[k * n:(k + 1) * n]
        return out

    def _judge(self, prompts: list[Any], texts: list[str], completions: list[Any], columns: dict[str, Any],
               question: str) -> Tensor:
        """The judge's scores of (prompt, text) rows, (R,) or (R, K) float32 on the CPU. A
        conversational completion stays one: the judge gets [{"role": "assistant", ...}]."""
        if self.judge is not None:
            shaped = [[{"role": "assistant", "content": text}] if isinstance(original, list) else text
                      for text, original in zip(texts, completions, strict=True)]
            return call_reward(self.judge, prompts, shaped, **columns).float().cpu()
        rows = self._encode([self.judge_text(p, t, question) for p, t in zip(prompts, texts, strict=True)],
                            self.config.max_context)
        groups = self._groups(len(rows))
        yes_id, no_id = self.answer_ids
        parts = [yes_probability(self.model, [rows[i] for i in group], yes_id, no_id, self.tokenizer.pad_token_id)
                 for group in groups]
        return torch.cat(parts).cpu()

    def _groups(self, count: int) -> list[list[int]]:
        """Row groups scored in one forward: each response's simulations together when rows are
        batch-independent (padding never mixes two responses), else chunks of batch_size."""
        size = self.config.n_simulations if self.config.batch_independent else self.config.batch_size
        size = min(size, self.config.batch_size)
        return [list(range(start, min(start + size, count))) for start in range(0, count, size)]

    def _encode(self, texts: list[str], limit: int) -> list[list[int]]:
        """Token ids of each text, cut to its last `limit` tokens (cuts counted in the log)."""
        ids = [list(self.tokenizer(text)["input_ids"]) for text in texts]
        cut = sum(len(row) > limit for row in ids)
        if cut:
            log.warning("rlhs: %d of %d simulator inputs are longer than %d tokens; kept their last %d "
                        "(raise max_context)", cut, len(ids), limit, limit)
        return [row[-limit:] for row in ids]

    def _facts(self, columns: dict[str, Any], count: int) -> list[Any] | None:
        """The `facts_column` of each row; a missing column is an error naming it."""
        column = self.config.facts_column
        if column is None:
            return None
        values = columns.get(column)
        if not isinstance(values, (list, tuple)) or len(values) != count:
            raise ValueError(f"rlhs facts_column {column!r}: the batch has no such column (one value per row); "
                             f"columns: {sorted(columns)}")
        return list(values)

    @staticmethod
    def _repeat_columns(columns: dict[str, Any], count: int, n: int) -> dict[str, Any]:
        """Row-aligned columns repeated once per simulation; others as they are."""
        return {key: repeat_rows(value, n) if isinstance(value, (list, tuple)) and len(value) == count else value
                for key, value in columns.items()}


__all__ = ["HindsightReward", "HindsightScores", "render_conversation", "row_seed", "yes_probability"]
