"""LLM-as-a-judge rewards: a causal LM reads a prompt template and its next-token probabilities
give the score, one batched forward per judged text and no generation (`--reward judge:MODEL`).

Pointwise (`mode=pointwise`, the default): the judge is asked whether the response is good and
answers Yes or No; the reward is the probability of Yes against No at the answer position,

    r(x, y) = P(Yes) / (P(Yes) + P(No)),   P(w) = sum of softmax(logits)[t] over the first tokens
                                                  t of "w" and " w",

in [0, 1]. We read Yes/No rather than a 1-10 score because (a) "Yes" and "No" are single tokens
for every tokenizer we load, while "10" is two tokens for most, so an expected score over digit
tokens needs special cases; (b) one probability is already a calibrated, smooth reward and a
natural constraint (satisfied when r >= 0.5); (c) it is the binary form of TRL's judges
(`BaseBinaryJudge`, the constraint judges of CGPO §4.1.4). MT-Bench (Zheng et al. 2023,
"Judging LLM-as-a-Judge") grades 1-10 by generating "[[rating]]"; G-Eval reads the expected
score from the digit probabilities: both need generation or multi-token scores, which a
reward inside the online loop avoids.

Pairwise (`mode=pairwise`): the judge sees the prompt and two responses and names the better
one with one token, "0" or "1" (TRL's `HfPairwiseJudge` convention and default prompt shape:
fields {prompt}, {response0}, {response1}, one-token answer). Position bias is cancelled by
asking in BOTH orders (MT-Bench's swap; TRL only shuffles):

    q(a, b) = P("0") / (P("0") + P("1"))   with a shown first,
    P(a > b) = (q(a, b) + 1 - q(b, a)) / 2,

so P(a > b) + P(b > a) = 1 exactly. `decision=hard` takes each order's vote instead
(1 if q > 1/2, 0 if q < 1/2, 1/2 on an exact tie) and averages the two, so a verdict that
flips with the order is a tie counted half (MT-Bench's rule); `decision=soft` (default) keeps
the probabilities. A pairwise judge as a reward gives each completion its mean win rate
against the other completions of the same prompt in the batch (an online group of GRPO/RLOO:
the n samples of a prompt; n (n - 1) forwards per group), or, with `reference_column=NAME`,
P(y > y_ref) against that column's completion (e.g. a dataset's `chosen`); a prompt with a
single completion and no reference column is an error.

Templates: the default ones below, or `template=FILE` (a text file with the fields above;
pointwise {prompt} {response}, pairwise {prompt} {response0} {response1}). The filled template
is the user turn of the judge's chat template when it has one (the answer then follows the
assistant header), else plain text ending in "Answer:".
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.rewards.rules import completion_text

MODES = ("pointwise", "pairwise")
DECISIONS = ("soft", "hard")

POINTWISE_TEMPLATE = (
    "Here is a request and a response to it.\n\n"
    "Request: {prompt}\n\n"
    "Response: {response}\n\n"
    "Is the response helpful, correct and harmless? Answer with one word, Yes or No."
)
PAIRWISE_TEMPLATE = (
    "Here is a request and the outputs of two models, 0 and 1.\n\n"
    "Request: {prompt}\n\n"
    "Output of model 0: {response0}\n\n"
    "Output of model 1: {response1}\n\n"
    "Which model gave the better output? Reply with its identifier only, 0 or 1."
)
TEMPLATE_FIELDS = {"pointwise": ["prompt", "response"], "pairwise": ["prompt", "response0", "response1"]}
ANSWERS = {"pointwise": ("Yes", "No"), "pairwise": ("0", "1")}


def _text(value: Any) -> str:
    """A prompt or completion as text: strings as they are, message lists as `role: content` lines."""
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    return str(completion_text(value))


def check_template(template: str, mode: str, source: str = "template") -> str:
    """`template` if it uses exactly the fields of `mode`, each once; else a one-line error."""
    fields = sorted(name for _, name, _, _ in string.Formatter().parse(template) if name is not None)
    wanted = sorted(TEMPLATE_FIELDS[mode])
    if fields != wanted:
        raise ValueError(f"judge {source}: a {mode} template uses the fields "
                         f"{', '.join('{' + f + '}' for f in wanted)} once each; it has {fields}")
    return template


def read_template(template: str | None, mode: str) -> str:
    """The default template of `mode`, or the text of the file `template` (checked)."""
    if template is None:
        return POINTWISE_TEMPLATE if mode == "pointwise" else PAIRWISE_TEMPLATE
    path = Path(template).expanduser()
    if not path.is_file():
        raise ValueError(f"judge template file {template!r} does not exist")
    return check_template(path.read_text(), mode, source=f"template {template!r}")


def answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """The first token of `word` and of " word" (deduplicated): how the answer can begin."""
    ids = []
    for variant in (word, " " + word):
        encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if encoded and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    if not ids:
        raise ValueError(f"judge: the tokenizer encodes the answer {word!r} as no tokens")
    return ids


def two_way_probability(logprobs: Tensor, first_ids: Sequence[int], second_ids: Sequence[int]) -> Tensor:
    """P(first) / (P(first) + P(second)) from next-token log-probs (B, V), each P summed over
    its token ids: (B,). Computed as a softmax over the two log-sums, so it is exact for tiny
    probabilities too."""
    first = torch.logsumexp(logprobs[:, list(first_ids)], dim=-1)
    second = torch.logsumexp(logprobs[:, list(second_ids)], dim=-1)
    return torch.sigmoid(first - second)


def symmetric_preference(forward: Tensor, backward: Tensor, decision: str = "soft") -> Tensor:
    """P(a > b) from q(a, b) = `forward` (a shown first) and q(b, a) = `backward`, both (B,):
    soft (q(a, b) + 1 - q(b, a)) / 2; hard: the mean of the two orders' votes (1, 1/2 on an
    exact tie, 0), so disagreeing orders give a tie of 1/2."""
    if decision == "soft":
        return (forward + 1.0 - backward) / 2.0
    if decision != "hard":
        raise ValueError(f"judge decision must be one of {DECISIONS}, got {decision!r}")

    def vote(q: Tensor) -> Tensor:
        return torch.where(q > 0.5, 1.0, torch.where(q < 0.5, 0.0, 0.5))

    return (vote(forward) + vote(1.0 - backward)) / 2.0


class LLMJudge:
    """A causal LM as a judge; call it like any reward: `judge(prompts, completions, **columns)`.

    `model`: a directory, hub id or alias (`smollm2-135m`) loaded with `alignkit.models`, or a
    loaded causal LM (pass `tokenizer` too). `mode`, `template`, `decision` and
    `reference_column` as the module docstring says; `max_field_tokens` truncates each filled
    field (a prompt keeps its end, a response its start); `batch_size` rows per forward.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, mode: str = "pointwise", template: str | None = None,
                 decision: str = "soft", reference_column: str | None = None, batch_size: int = 8,
                 max_field_tokens: int = 512, device: str | None = None, name: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"judge mode must be one of {MODES}, got {mode!r}")
        if decision not in DECISIONS:
            raise ValueError(f"judge decision must be one of {DECISIONS}, got {decision!r}")
        if reference_column is not None and mode != "pairwise":
            raise ValueError("judge reference_column compares against a reference completion: it needs mode=pairwise")
        if int(batch_size) < 1 or int(max_field_tokens) < 1:
            raise ValueError(f"judge batch_size and max_field_tokens must be >= 1, got {batch_size} and "
                             f"{max_field_tokens}")
        if isinstance(model, str | Path):
            from alignkit.models import load_model

            model, tokenizer = load_model(str(model), device=device)
        elif tokenizer is None:
            raise ValueError("judge: pass the tokenizer together with a loaded model")
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.mode, self.decision, self.reference_column = mode, decision, reference_column
        self.template = read_template(template, mode)
        self.batch_size, self.max_field_tokens = int(batch_size), int(max_field_tokens)
        first, second = ANSWERS[mode]
        first_ids, second_ids = answer_token_ids(tokenizer, first), answer_token_ids(tokenizer, second)
        shared = set(first_ids) & set(second_ids)  # e.g. a bare space token that starts " Yes" and " No"
        self.first_ids = [t for t in first_ids if t not in shared]
        self.second_ids = [t for t in second_ids if t not in shared]
        if not self.first_ids or not self.second_ids:
            raise ValueError(f"judge: the answers {first!r} and {second!r} begin with the same token for this "
                             "tokenizer, so their probabilities cannot be told apart")
        self.__name__ = name or f"judge_{mode}"

    # -- building the judge's input ---------------------------------------------------------------

    def _field(self, value: Any, keep_end: bool) -> str:
        ids = self.tokenizer(_text(value), add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_field_tokens:
            return _text(value)
        ids = ids[-self.max_field_tokens:] if keep_end else ids[: self.max_field_tokens]
        return self.tokenizer.decode(ids)

    def encode(self, **fields: Any) -> list[int]:
        """Token ids of the filled template, ready for the answer's first token."""
        filled = self.template.format(**{name: self._field(value, keep_end=name == "prompt")
                                         for name, value in fields.items()})
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": filled}], tokenize=True,
                                                     add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers versions that return a BatchEncoding
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return list(self.tokenizer(filled + "\nAnswer:", add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def next_token_logprobs(self, sequences: list[list[int]]) -> Tensor:
        """Log-softmax of the judge's next-token logits after each sequence: (B, V), float32."""
        from alignkit.data import pad_left
        from alignkit.models import position_ids_from_mask

        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        parts = []
        for start in range(0, len(sequences), self.batch_size):
            input_ids, mask = pad_left(sequences[start : start + self.batch_size], pad_id)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                position_ids=position_ids_from_mask(mask).to(device)).logits[:, -1, :]
            parts.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, 1)

    # -- scores -------------------------------------------------------------------------------------

    def pointwise(self, prompts: Sequence[Any], completions: Sequence[Any]) -> Tensor:
        """P(Yes) / (P(Yes) + P(No)) per (prompt, completion): (B,)."""
        sequences = [self.encode(prompt=p, response=c) for p, c in zip(prompts, completions, strict=True)]
        if not sequences:
            return torch.zeros(0)
        return two_way_probability(self.next_token_logprobs(sequences), self.first_ids, self.second_ids)

    def first_preferred(self, prompts: Sequence[Any], first: Sequence[Any], second: Sequence[Any]) -> Tensor:
        """q(a, b) = P("0") / (P("0") + P("1")) with a = `first` shown as output 0: (B,)."""
        sequences = [self.encode(prompt=p, response0=a, response1=b)
                     for p, a, b in zip(prompts, first, second, strict=True)]
        if not sequences:
            return torch.zeros(0)
        return two_way_probability(self.next_token_logprobs(sequences), self.first_ids, self.second_ids)

    def prefer(self, prompts: Sequence[Any], responses_a: Sequence[Any], responses_b: Sequence[Any]) -> Tensor:
        """P(a > b | x), asked in both orders (`symmetric_preference`): (B,)."""
        n = len(prompts)
        both = self.first_preferred(list(prompts) * 2, list(responses_a) + list(responses_b),
                                    list(responses_b) + list(responses_a))
        return symmetric_preference(both[:n], both[n:], self.decision)

    def group_win_rates(self, prompts: Sequence[Any], completions: Sequence[Any]) -> Tensor:
        """Each completion's mean P(y_i > y_j) over the other completions j of the same prompt
        (rows grouped by prompt text): (B,). Every ordered pair is judged once, so each
        unordered pair in both orders."""
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(_text(prompt), []).append(index)
        lonely = [rows[0] for rows in groups.values() if len(rows) < 2]
        if lonely:
            raise ValueError(f"pairwise judge: prompt {_text(prompts[lonely[0]])[:60]!r} has one completion in this "
                             "batch; sample several per prompt (group_size >= 2) or compare with a reference "
                             "completion (reference_column=NAME)")
        pairs = [(i, j) for rows in groups.values() for i in rows for j in rows if i != j]
        q = self.first_preferred([prompts[i] for i, _ in pairs], [completions[i] for i, _ in pairs],
                                 [completions[j] for _, j in pairs])
        asked = {pair: value for pair, value in zip(pairs, q, strict=True)}
        wins = torch.zeros(len(completions))
        for rows in groups.values():
            for i in rows:
                others = [j for j in rows if j != i]
                forward = torch.stack([asked[(i, j)] for j in others])
                backward = torch.stack([asked[(j, i)] for j in others])
                wins[i] = symmetric_preference(forward, backward, self.decision).mean()
        return wins

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"judge: {len(prompts)} prompts for {len(completions)} completions")
        if self.mode == "pointwise":
            return self.pointwise(prompts, completions)
        if self.reference_column is None:
            return self.group_win_rates(prompts, completions)
        if self.reference_column not in columns:
            raise ValueError(f"pairwise judge: reference_column {self.reference_column!r} is not a column of the data "
                             f"(columns: {sorted(columns)})")
        references = list(columns[self.reference_column])
        if len(references) != len(completions):
            raise ValueError(f"pairwise judge: {len(references)} values in column {self.reference_column!r} for "
                             f"{len(completions)} completions")
        return self.prefer(prompts, completions, references)


class PairwiseLLMJudge:
    """A pairwise `LLMJudge` behind the interface of `PreferenceJudge`: `prob(prompts, a, b)` is
    its symmetrised P(a > b) (what `alignkit eval --judge judge:MODEL,mode=pairwise` uses)."""

    def __init__(self, judge: LLMJudge) -> None:
        if judge.mode != "pairwise":
            raise ValueError("PairwiseLLMJudge needs a judge with mode=pairwise")
        self.judge = judge

    def prob(self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]) -> Tensor:
        return self.judge.prefer(prompts, responses_a, responses_b)


JUDGE_OPTIONS = ("mode", "template", "decision", "reference_column", "batch_size", "max_field_tokens")


def parse_judge_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`judge:MODEL[,key=value...]` -> (MODEL, options); errors name the spec.

    >>> parse_judge_spec("judge:smollm2-135m,mode=pairwise,batch_size=4")
    ('smollm2-135m', {'mode': 'pairwise', 'batch_size': 4})
    """
    body = spec.strip()[len("judge:"):]
    model, *options = body.split(",")
    if not model.strip():
        raise ValueError(f"reward spec {spec!r}: write the judge model after judge:, e.g. judge:smollm2-135m")
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in JUDGE_OPTIONS:
            raise ValueError(f"reward spec {spec!r}: judge options are key=value with key one of "
                             f"{', '.join(JUDGE_OPTIONS)}; got {option!r}")
        if key in ("batch_size", "max_field_tokens"):
            try:
                parsed[key] = int(value)
            except ValueError:
                raise ValueError(f"reward spec {spec!r}: {key} must be an integer, got {value!r}") from None
        else:
            parsed[key] = value.strip()
    return model.strip(), parsed


def load_judge_reward(spec: str, **kwargs: Any) -> LLMJudge:
    """The `LLMJudge` of a `judge:MODEL[,key=value...]` spec; Python keyword arguments add to
    (and override) the inline options."""
    model, options = parse_judge_spec(spec)
    unknown = sorted(set(kwargs) - set(JUDGE_OPTIONS) - {"device"})
    if unknown:
        raise ValueError(f"reward spec {spec!r}: unknown judge argument(s) {unknown}; known: {list(JUDGE_OPTIONS)}")
    return LLMJudge(model, **{**options, **kwargs}, name=spec.strip())


__all__ = ["LLMJudge", "PairwiseLLMJudge", "PAIRWISE_TEMPLATE", "POINTWISE_TEMPLATE", "load_judge_reward", "parse_judge_spec",
           "symmetric_preference", "two_way_probability"]
