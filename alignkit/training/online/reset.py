"""DR-PO's dataset reset (Chang et al. 2024, "Dataset Reset Policy Optimization for RLHF";
Cornell-RL/drpo `src/tldr/drpo.py` with TRIL's `RollinProcessor`): the `drpo` preset, and the
`reset_prob` / `reset_column` settings of any policy-gradient preset.

Each prompt row may carry an offline response y* (the `reset_column`; by default `chosen`,
else `response`, else `completion`). Per sampled row, with L = |y*| tokens (cut to
max_new_tokens; 0 for a row without one):

    reset ~ Bernoulli(reset_prob)                      (the official `Args.beta`, default 1.0)
    k     = 1 + floor(u (L - 1)),  u ~ U[0, 1)          uniform on {1, ..., L - 1}; L < 2: no reset
    y_1..y_k = y*_1..y*_k  (rolled in: teacher-forced), y_{k+1}.. ~ pi_theta(. | x, y_<=k)

(`prefix_lengths`). The draws are counter-based noise keyed on (seed, step, generation round,
row), so a resumed run rolls in exactly what the interrupted run would have. The roll-in happens
inside the engine's decode loop (`HFEngine.generate(prefixes=...)`), so the response, its
log-probs, the reference log-probs, the KL and the values cover roll-in + continuation, the
reward scores the whole response, and only the policy-gradient term skips the rolled-in tokens
(`Rollout.rollin_mask`, applied in `steps.policy_gradient_update`): the official loss
`sum(pg * ~rollin) / sum(~rollin)`, the value loss and the KL as usual. The total response
(roll-in included) is at most max_new_tokens long, as the official fixed response length.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from alignkit.advantages import ADVANTAGE_KINDS
from alignkit.data import RowTable
from alignkit.data.tokenize import render_prompt_and_responses
from alignkit.rollout.sampling import counter_uniform

log = logging.getLogger("alignkit")

RESET_COLUMNS = ("chosen", "response", "completion")
"""The columns an offline response is looked for in, in order, when `reset_column` is unset."""


def prefix_lengths(lengths: Tensor, reset_uniform: Tensor, length_uniform: Tensor, reset_prob: float) -> Tensor:
    """Roll-in lengths k (N,) int64 of rows whose offline responses have `lengths` L (N,):

        k = 1 + floor(u (L - 1))  if v < reset_prob and L >= 2,  else 0,

    v = `reset_uniform`, u = `length_uniform`, both (N,) in [0, 1). k is uniform on {1, ..., L - 1}
    (TRIL's random row of a lower-triangular mask over the first L - 1 positions): the policy
    always generates at least the last token itself."""
    lengths = lengths.long()
    drawn = 1 + torch.floor(length_uniform.double() * (lengths - 1).clamp(min=0).double()).long()
    reset = (reset_uniform < reset_prob) & (lengths >= 2)
    return torch.where(reset, drawn, 0)


def rollin_prefixes(responses: list[list[int] | None], group_size: int, reset_prob: float,
                    seed: int) -> list[list[int]]:
    """The prefix each of the B x G rows rolls in (empty: no reset): row i * G + j draws its own
    (v, u) from counter-based noise keyed on (`seed`, row) and takes the first k tokens of prompt
    i's offline response (`prefix_lengths`)."""
    per_row = [responses[row // group_size] or [] for row in range(len(responses) * group_size)]
    rows = torch.arange(len(per_row), dtype=torch.long).unsqueeze(-1)  # (N, 1)
    noise = counter_uniform(seed, rows, torch.arange(2, dtype=torch.long).unsqueeze(0))  # (N, 2)
    ks = prefix_lengths(torch.tensor([len(r) for r in per_row]), noise[:, 0], noise[:, 1], reset_prob)
    return [response[:k] for response, k in zip(per_row, ks.tolist(), strict=True)]


def choose_reset_column(table: RowTable, setting: str | None) -> str:
    """The column the offline responses come from: `setting` (which some row must have), or the
    first of RESET_COLUMNS that some row has; a one-line error otherwise."""
    present = set(table.columns)
    if setting is not None:
        if setting not in present:
            raise ValueError(f"reset_column={setting!r}: no row of {table.source} has that column "
                             f"(columns: {sorted(present)})")
        return setting
    for column in RESET_COLUMNS:
        if column in present:
            return column
    raise ValueError(f"reset_prob > 0 rolls in offline responses, but no row of {table.source} has a "
                     f"{', '.join(RESET_COLUMNS)} column: add one, or name it with --set reset_column=NAME")


def offline_responses(table: RowTable, tokenizer: Any, column: str, *, chat: bool,
                      max_new_tokens: int) -> list[list[int] | None]:
    """Each row's offline response as token ids, rendered as SFT data renders a completion (the
    chat template for conversational rows, ending at EOS) and cut to `max_new_tokens`; None for
    a row without one (it is never reset). A row that cannot be rendered is an error naming it."""
    out: list[list[int] | None] = []
    cut = 0
    for index, row in enumerate(table.rows):
        if row.get(column) is None or row.get(column) == "":
            out.append(None)
            continue
        try:
            _, (text,) = render_prompt_and_responses(row, tokenizer, (column,), apply_chat_template=chat)
        except (KeyError, ValueError, TypeError) as error:
            raise table.error(index, f"reset_column {column!r}: cannot render the offline response: {error}") from error
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        cut += len(ids) > max_new_tokens
        out.append(ids[:max_new_tokens])
    missing = sum(ids is None for ids in out)
    log.info("dataset reset: offline responses from column %r for %d of %d prompt rows (%d cut to "
             "max_new_tokens=%d)", column, len(out) - missing, len(out), cut, max_new_tokens)
    return out


def load_reset_responses(table: RowTable, tokenizer: Any, s: Any, *, chat: bool,
                         engine: Any) -> list[list[int] | None] | None:
    """The offline responses the sampler rolls in (None when reset_prob = 0); an engine that
    cannot force prefixes is refused."""
    if s.reset_prob <= 0:
        return None
    if not getattr(engine, "supports_rollin", False):
        raise ValueError(f"reset_prob={s.reset_prob} (dataset reset) rolls offline prefixes in inside the "
                         f"in-process engine's decode loop; {type(engine).__name__} cannot: drop --rollout "
                         "vllm / --placement split, or set reset_prob=0")
    column = choose_reset_column(table, s.reset_column)
    return offline_responses(table, tokenizer, column, chat=chat, max_new_tokens=s.max_new_tokens)


def check_reset_settings(s: Any, preset: str) -> None:
    """The settings of the dataset reset and of GAE's reward whitening (OnlineSettings `s`)."""
    if not 0 <= s.reset_prob <= 1:
        raise ValueError(f"{preset}: reset_prob must be in [0, 1], got {s.reset_prob}")
    if s.reset_prob > 0 and s.objective != "policy_gradient":
        raise ValueError(f"{preset}: reset_prob > 0 masks the rolled-in tokens out of a policy-gradient loss: "
                         f"it needs objective=policy_gradient (got {s.objective!r})")
    if s.whiten_rewards and (ADVANTAGE_KINDS[s.advantage] != "critic" or s.lagrangian):
        raise ValueError(f"{preset}: whiten_rewards whitens GAE's per-token rewards: it needs a critic advantage "
                         f"(advantage=gae) without lagrangian (advantage is {s.advantage!r})")


def rollin_metrics(rollin_mask: Tensor) -> dict[str, float]:
    """drpo/reset_fraction (share of samples with a roll-in) and drpo/rollin_tokens (rolled-in
    tokens per sample, over every sample) of a step's training rows; rollin_mask (N, L)."""
    per_row = rollin_mask.sum(-1).float()  # (N,)
    return {"drpo/reset_fraction": (per_row > 0).float().mean().item(),
            "drpo/rollin_tokens": per_row.mean().item()}
