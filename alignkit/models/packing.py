"""Padding-free forward passes: many rows packed into few, shared prompts computed once.

A padded batch (B, T) spends decoder work on padding, and on every prompt as many times as
rows share it (chosen and rejected of a DPO pair, the G samples of a GRPO group). Packing
lays the rows' real tokens end to end in R <= B rows of length L <= `capacity` (first-fit
decreasing) and gives the decoder a 4-D additive mask that keeps them apart. Rows whose
prompts (the tokens before their first scored token) are equal form one *unit*:

    [prompt | suffix_1 | suffix_2 | ... | suffix_k]

where suffix_i attends to the prompt and to its own earlier tokens only, with positions
continuing from the prompt (|prompt|, |prompt| + 1, ...). In a causal decoder the hidden
state of a token depends only on the tokens it may attend to and their positions, so

    h_packed[loc(b, t)] = h_padded[b, t]    for every real token t of row b

up to floating-point rounding; gradients of tokens shared by k rows are the sum of the k
rows' gradients, which is what the padded batch computes. The mask is exact only for
decoders whose attention is plain causal attention over `position_ids` (rotary or learned
absolute positions, no sliding window shorter than a packed row, no ALiBi): `supported`
lists the architectures checked in tests/test_packing.py, and `predictor_states` compares
packed and padded hidden states of a fixed probe batch once per model before packing its
batches, keeping padding (with a warning) if they differ.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger("alignkit")

# model_type values whose decoders take a custom 4-D mask and `position_ids` and nothing else
# that depends on row layout (tests/test_packing.py checks each against the padded forward).
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
DEFAULT_CAPACITY = 256
MAX_MASK_ELEMENTS = 1 << 26  # R * L * L entries of the mask: 256 MiB at float32
MIN_SAVING = 0.9  # pack only if R * L <= 0.9 * B * T

_ENABLED: ContextVar[bool] = ContextVar("alignkit_padding_free", default=False)
_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> bool


@contextlib.contextmanager
def padding_free(enabled: bool = True):
    """Within the block, `predictor_states` packs batches (where `supported`)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def supported(decoder: nn.Module) -> bool:
    """Whether `decoder`'s attention is exact under a packed 4-D mask (see module docstring)."""
    config = getattr(decoder, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def _sliding_window(decoder: nn.Module) -> int | None:
    """The shortest attention window any layer applies, or None when all attend fully."""
    config = decoder.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and all(kind == "full_attention" for kind in layer_types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


@dataclass
class PackPlan:
    """Where every real token of a (B, T) batch sits in the packed (R, L) batch.

    input_ids, position_ids (R, L) long; allowed (R, L, L) bool: query q may attend key k;
    row, col (B, T) long: packed coordinates of token (b, t) (-1 off the real tokens).
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    row: Tensor
    col: Tensor

    def additive_mask(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(R, 1, L, L): 0 where attention is allowed, the dtype's minimum elsewhere."""
        mask = torch.zeros(self.allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~self.allowed.to(device), torch.finfo(dtype).min)
        return mask.unsqueeze(1)


@dataclass
class _Unit:
    """A prompt shared by rows, then each row's own suffix: row b's tokens are
    `tokens[b][:prefix]` (shared) + `tokens[b][prefix:]`."""

    rows: list[int]
    prefix: int

    def length(self, lengths: list[int]) -> int:
        return self.prefix + sum(lengths[b] - self.prefix for b in self.rows)


def _units(tokens: list[list[int]], first_scored: list[int], capacity: int) -> list[_Unit]:
    """Rows grouped by equal prompt (tokens before the first scored one), each group split so
    that no unit is longer than max(capacity, prompt + its longest suffix)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    singles: list[_Unit] = []
    for b, ids in enumerate(tokens):
        prefix = first_scored[b]
        if prefix <= 0 or prefix >= len(ids):
            singles.append(_Unit([b], len(ids)))
        else:
            groups.setdefault(tuple(ids[:prefix]), []).append(b)
    lengths = [len(ids) for ids in tokens]
    units = list(singles)
    for prompt, rows in groups.items():
        prefix = len(prompt)
        if len(rows) == 1:
            units.append(_Unit(rows, lengths[rows[0]]))
            continue
        current: list[int] = []
        for b in rows:
            if current and _Unit([*current, b], prefix).length(lengths) > capacity:
                units.append(_Unit(current, prefix))
                current = []
            current.append(b)
        units.append(_Unit(current, prefix))
    return units


def plan_packing(input_ids: Tensor, attention_mask: Tensor, predict: Tensor,
                 capacity: int = DEFAULT_CAPACITY) -> PackPlan | None:
    """The packed layout of a batch, or None when packing does not pay or does not apply.

    input_ids, attention_mask (B, T); predict (B, T-1) bool: token t of row b is scored (its
    predictor is position t-1). Every row's real tokens must be one contiguous run (left or
    right padding); rows are packed whole, prompts shared as described in the module docstring.
    """
    attention = attention_mask.bool().cpu()
    batch, width = attention.shape
    lengths = attention.sum(-1)
    if batch == 0 or bool((lengths == 0).any()):
        return None
    starts = attention.int().argmax(-1)
    ends = width - attention.flip(-1).int().argmax(-1)
    if not bool(((ends - starts) == lengths).all()):
        return None  # holes inside a row: keep the padded layout
    ids_cpu = input_ids.cpu()
    scored = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), predict.bool().cpu()], dim=1)
    tokens, first_scored = [], []
    for b in range(batch):
        s, e = int(starts[b]), int(ends[b])
        tokens.append(ids_cpu[b, s:e].tolist())
        hits = scored[b, s:e].nonzero()
        first_scored.append(int(hits[0]) if len(hits) else 0)
    units = _units(tokens, first_scored, capacity)
    lens = [len(t) for t in tokens]
    unit_lengths = [u.length(lens) for u in units]
    bin_size = max(capacity, max(unit_lengths))
    bins: list[list[int]] = []
    fill: list[int] = []
    for u in sorted(range(len(units)), key=lambda i: -unit_lengths[i]):
        for i, used in enumerate(fill):
            if used + unit_lengths[u] <= bin_size:
                bins[i].append(u)
                fill[i] += unit_lengths[u]
                break
        else:
            bins.append([u])
            fill.append(unit_lengths[u])
    rows, length = len(bins), max(fill)
    if rows * length > MIN_SAVING * batch * width or rows * length * length > MAX_MASK_ELEMENTS:
        return None
    packed = torch.zeros(rows, length, dtype=ids_cpu.dtype)
    positions = torch.zeros(rows, length, dtype=torch.long)
    unit_of = torch.empty(rows, length, dtype=torch.long)
    branch_of = torch.zeros(rows, length, dtype=torch.long)
    row = torch.full((batch, width), -1, dtype=torch.long)
    col = torch.full((batch, width), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        offset = 0
        for u in members:
            unit = units[u]
            head = tokens[unit.rows[0]][: unit.prefix]
            span = slice(offset, offset + unit.prefix)
            packed[r, span] = torch.tensor(head, dtype=ids_cpu.dtype)
            positions[r, span] = torch.arange(unit.prefix)
            unit_of[r, span] = u
            for b in unit.rows:
                s = int(starts[b])
                row[b, s : s + unit.prefix] = r
                col[b, s : s + unit.prefix] = torch.arange(offset, offset + unit.prefix)
            offset += unit.prefix
            for branch, b in enumerate(unit.rows, start=1):
                suffix = tokens[b][unit.prefix :]
                if not suffix:
                    continue
                span = slice(offset, offset + len(suffix))
                packed[r, span] = torch.tensor(suffix, dtype=ids_cpu.dtype)
                positions[r, span] = torch.arange(unit.prefix, unit.prefix + len(suffix))
                unit_of[r, span] = u
                branch_of[r, span] = branch
                s = int(starts[b]) + unit.prefix
                row[b, s : s + len(suffix)] = r
                col[b, s : s + len(suffix)] = torch.arange(offset, offset + len(suffix))
                offset += len(suffix)
        unit_of[r, offset:] = -1 - torch.arange(length - offset)  # filler: attends itself only
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_unit = unit_of[:, :, None] == unit_of[:, None, :]
    same_branch = (branch_of[:, None, :] == 0) | (branch_of[:, :, None] == branch_of[:, None, :])
    allowed = same_unit & same_branch & causal
    return PackPlan(packed, positions, allowed, row, col)


def _padded_predictors(decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, predict: Tensor,
                       position_ids: Tensor) -> Tensor:
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state  # (B, T, H)
    return hidden[:, :-1][predict]


def _packed_predictors(decoder: nn.Module, plan: PackPlan, predict: Tensor, device: torch.device,
                       dtype: torch.dtype) -> Tensor:
    hidden = decoder(input_ids=plan.input_ids.to(device), position_ids=plan.position_ids.to(device),
                     attention_mask=plan.additive_mask(dtype, device), use_cache=False).last_hidden_state
    predict = predict.cpu()
    rows, cols = plan.row[:, :-1][predict].to(device), plan.col[:, :-1][predict].to(device)
    return hidden[rows, cols]  # (M, H)


def _agrees(decoder: nn.Module, packed: Tensor, padded: Tensor) -> bool:
    """Packed and padded predictor states equal to rounding (relative to their scale)."""
    if packed.shape != padded.shape:
        return False
    tolerance = 1e-3 if packed.dtype == torch.float32 else 5e-2
    scale = max(1.0, float(padded.detach().abs().max())) if padded.numel() else 1.0
    diff = float((packed.detach().float() - padded.detach().float()).abs().max()) if padded.numel() else 0.0
    if diff > tolerance * scale:
        log.warning("padding-free batches turned off for this %s: packed hidden states differ from the "
                    "padded ones by %.3g (scale %.3g)", type(decoder).__name__, diff, scale)
        return False
    return True


def _probe_batch(vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A fixed small batch that exercises every packing case: two rows sharing a prompt (right
    padded), one left-padded row of its own. (input_ids, attention_mask, predict)."""
    g = torch.Generator().manual_seed(0)
    high = max(2, min(vocab_size, 1000))
    prompt, own = torch.randint(1, high, (6,), generator=g), torch.randint(1, high, (9,), generator=g)
    first, second = torch.randint(1, high, (5,), generator=g), torch.randint(1, high, (3,), generator=g)
    ids = torch.zeros(3, 11, dtype=torch.long)
    attention = torch.zeros(3, 11, dtype=torch.long)
    ids[0, :11], attention[0, :11] = torch.cat([prompt, first]), 1
    ids[1, :9], attention[1, :9] = torch.cat([prompt, second]), 1
    ids[2, 2:], attention[2, 2:] = own, 1
    scored = torch.zeros(3, 11, dtype=torch.bool)
    scored[0, 6:11], scored[1, 6:9], scored[2, 6:] = True, True, True
    return ids.to(device), attention.to(device), (scored & attention.bool())[:, 1:].to(device)


def _check(decoder: nn.Module) -> bool:
    """Whether packed and padded forwards agree on `_probe_batch`, compared in eval mode (no
    dropout, no random numbers drawn) without gradients; the module's mode is restored. The
    batch is the same on every rank, so under torchrun all ranks run these two forwards
    together (sharded engines gather weights in each)."""
    parameter = next(decoder.parameters())
    ids, attention, predict = _probe_batch(int(getattr(decoder.config, "vocab_size", 2) or 2), parameter.device)
    plan = plan_packing(ids, attention, predict, capacity=32)
    if plan is None:
        return False
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            packed = _packed_predictors(decoder, plan, predict, ids.device, parameter.dtype)
            padded = _padded_predictors(decoder, ids, attention, predict, positions)
    finally:
        decoder.train(was_training)
    return _agrees(decoder, packed, padded)


def predictor_states(decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, predict: Tensor,
                     position_ids: Tensor, *, packable: bool = True) -> Tensor:
    """The hidden states h_{t-1} that predict the scored tokens: (M, H), in the row-major
    order of `predict` (B, T-1), i.e. `decoder(...).last_hidden_state[:, :-1][predict]`.

    Inside `padding_free()` and for a `supported` decoder the batch is packed (`plan_packing`);
    before its first use for a decoder, packing is checked on a fixed probe batch (`_check`).
    `packable=False` (caller-made positions, e.g. rows packed already) keeps the layout.
    """
    plan = None
    if packable and _ENABLED.get() and supported(decoder):
        if decoder not in _verified:
            _verified[decoder] = _check(decoder)
        if _verified[decoder]:
            plan = plan_packing(input_ids, attention_mask, predict)
            window = _sliding_window(decoder) if plan is not None else None
            if window is not None and plan.input_ids.shape[1] > window:
                plan = None
    if plan is None:
        return _padded_predictors(decoder, input_ids, attention_mask, predict, position_ids)
    return _packed_predictors(decoder, plan, predict, input_ids.device, next(decoder.parameters()).dtype)
