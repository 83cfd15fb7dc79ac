"""Options that apply across the whole pairwise preference family, consumed by the trainer
(`PairwiseTask`) rather than passed to the loss function. Set them like hyper-parameters:
`alignkit train dpo --set length_normalize=true --set ref_sync=soft`.

Each option's docstring gives its equation, its paper and the extra forward passes it costs
per micro-batch of B pairs (the base cost is one forward + backward over the 2B sequences).
The helpers here are the stateful or model-touching parts; the maths stays in
`alignkit.objectives` (`ld_dpo`, `wpo_weights`, `combine_losses`, the losses themselves).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from alignkit.models import is_peft, load_model, reward_scores
from alignkit.models.logprobs import decoder_and_head, position_ids_from_mask
from alignkit.objectives import PAIRWISE, PairLogps, log_sum_squared_probs
from alignkit.objectives.registry import REFERENCE_FREE

SFT_COMPONENT = "sft"
"""`loss_weights` may name this besides the PAIRWISE losses: the chosen response's NLL."""
REF_SYNC_MODES = ("off", "soft", "hard")


@dataclass
class PairwiseOptions:
    """Family-wide options of the pairwise trainer (all off by default).

    Hyper-parameters shared by name (e.g. `beta`) apply to every loss that accepts them.
    """

    length_normalize: bool = False
    """Feed the loss length-normalised log-probs a(y) = logp(y) / |y| (policy and reference
    alike) instead of summed ones. The loss then sees token counts of 1, so losses that already
    normalise internally (ipo, sigmoid_norm, simpo, orpo, the NLL terms of rpo/cpo/cpl) are
    unchanged. No extra forward."""
    ref_sync: str = "off"
    """TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"):
    every `ref_sync_steps` optimizer steps, soft: theta_ref <- alpha theta + (1 - alpha) theta_ref;
    hard: theta_ref <- theta. The reference is then live (a deep copy of the model for full
    fine-tuning, a copy of the adapter weights for LoRA: reference = base + reference adapter)
    and costs one extra no-grad forward of the 2B sequences per micro-batch instead of the
    one-off cached pass. With LoRA the soft update mixes the adapter factors A and B (TRL's
    parameter-wise rule applied to the trainable parameters); hard sync is exact.
    Matches TRL's `sync_ref_model` + `SyncRefModelCallback`."""
    ref_sync_alpha: float = 0.6
    """TR-DPO mixing weight alpha for `ref_sync=soft` (TRL `ref_model_mixup_alpha`, 0.6)."""
    ref_sync_steps: int = 512
    """TR-DPO period tau in optimizer steps (TRL `ref_model_sync_steps`, 512); syncs after
    steps tau, 2 tau, ..."""
    ld_alpha: float | None = None
    """LD-DPO (Liu et al. 2024, "Length Desensitization in DPO"), alpha in [0, 1]: tokens past
    l_p = min(|y_w|, |y_l|) count alpha-fold in both the policy and the reference sums,
    logp_ld = sum_{t<=l_p} logp_t + alpha sum_{t>l_p} logp_t (`alignkit.objectives.ld_dpo`).
    The reference's LD sums depend only on its fixed log-probs and on the pair's lengths, so they
    are cached once as two scalars per pair (no per-token cache). No extra forward (TRL `ld_alpha`)."""
    use_weighting: bool = False
    """WPO (Zhou et al. 2024, Eq. 2): loss = mean_i w_i L_i with w_i = w(y_w) w(y_l),
    w(y) = exp(mean_t [logp_t - log sum_v pi(v)^2]) under the current policy, detached
    (`alignkit.objectives.wpo_weights`). Costs one extra no-grad forward of the 2B sequences per
    micro-batch (dropout off; vocabulary projected in chunks), since the log-prob kernel does not
    return log sum_v pi(v)^2. Matches TRL `use_weighting` (TRL reuses the training forward)."""
    loss_weights: dict[str, float] | None = None
    """Weighted sum of losses, e.g. `{dpo: 1.0, sft: 0.5}`: L = sum_k w_k mean_i L_k,i
    (`combine_losses`; TRL's `loss_type` list + `loss_weights`). Must name the trained loss;
    `sft` = -logp(y_w) / |y_w|. Each component takes the flat hyper-parameters it accepts.
    Logged per component as `loss/<name>`. No extra forward."""
    margin_reward_models: list[str] | None = None
    """MODPO: frozen reward models (directories or hub ids) of the other objectives; each scores
    chosen and rejected once before training, margins_k = r_k(x, y_w) - r_k(x, y_l) are stored
    per pair and the models freed. One no-grad forward per reward model over the data, once.
    Alternatively the data may carry a `margins` list column (K numbers per row)."""
    dynamic_beta: float | None = None
    """MM-DPO (MM-RLHF, Zhang et al. 2025) dynamic reward scaling, dpo only: the weight w of
    beta_i = beta (1 + w (1 - exp(-k delta_i))) (`alignkit.objectives.mm_dpo_beta`; the official
    scripts use w = 0.1), delta_i the reward margin of the pair: a `reward_margin` data column,
    or scored once before training by `dynamic_beta_rm`. No extra forward while training."""
    dynamic_beta_k: float = 1.0
    """MM-DPO's k (how fast the margin saturates the scaling); 1.0 is our default (the released
    code reads the factor precomputed, without k)."""
    dynamic_beta_rm: str | None = None
    """A saved reward model (directory) that scores chosen and rejected of every pair once
    before training (`RewardModelScorer`: image rows and context columns as it was trained);
    its margins replace a `reward_margin` column."""

    @classmethod
    def split(cls, hparams: Mapping[str, Any]) -> tuple[PairwiseOptions, dict[str, Any]]:
        """(the options found in `hparams`, the remaining loss hyper-parameters)."""
        names = {f.name for f in dataclasses.fields(cls)}
        options = cls(**{k: v for k, v in hparams.items() if k in names})
        options.normalise()
        return options, {k: v for k, v in hparams.items() if k not in names}

    def normalise(self) -> None:
        """Coerce values given as strings on the command line; check ranges."""
        if isinstance(self.loss_weights, str):
            self.loss_weights = yaml.safe_load(self.loss_weights)
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, Mapping) or not self.loss_weights:
                raise ValueError(f"loss_weights must be a mapping name -> weight, got {self.loss_weights!r}")
            self.loss_weights = {str(k): float(v) for k, v in self.loss_weights.items()}
            unknown = sorted(set(self.loss_weights) - set(PAIRWISE) - {SFT_COMPONENT})
            if unknown:
                raise ValueError(f"loss_weights: unknown loss(es) {unknown}; known: {sorted(PAIRWISE)} and sft")
        if isinstance(self.margin_reward_models, str):
            self.margin_reward_models = [self.margin_reward_models]
        if self.ref_sync is True or self.ref_sync is None or self.ref_sync is False:
            self.ref_sync = "soft" if self.ref_sync else "off"
        if self.ref_sync not in REF_SYNC_MODES:
            raise ValueError(f"ref_sync must be one of {REF_SYNC_MODES}, got {self.ref_sync!r}")
        if not 0.0 <= float(self.ref_sync_alpha) <= 1.0:
            raise ValueError(f"ref_sync_alpha must be in [0, 1], got {self.ref_sync_alpha}")
        if int(self.ref_sync_steps) < 1:
            raise ValueError(f"ref_sync_steps must be >= 1, got {self.ref_sync_steps}")
        if self.ld_alpha is not None and not 0.0 <= float(self.ld_alpha) <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.ld_alpha is not None and self.length_normalize:
            raise ValueError("ld_alpha and length_normalize are two length corrections; use one")
        if self.dynamic_beta is not None and (float(self.dynamic_beta) < 0 or float(self.dynamic_beta_k) <= 0):
            raise ValueError(f"dynamic_beta (w) must be >= 0 and dynamic_beta_k > 0, got {self.dynamic_beta}, {self.dynamic_beta_k}")
        if self.dynamic_beta is None and self.dynamic_beta_rm:
            raise ValueError("dynamic_beta_rm scores the margins of dynamic_beta: set --set dynamic_beta=W too")

    def components(self, loss_name: str) -> dict[str, float]:
        """Loss name -> weight of what is optimised ({loss_name: 1.0} without loss_weights)."""
        if self.loss_weights is None:
            return {loss_name: 1.0}
        if loss_name not in self.loss_weights:
            raise ValueError(
                f"loss_weights {self.loss_weights} must include the trained loss {loss_name!r}"
            )
        return dict(self.loss_weights)

    def images_problem(self) -> str | None:
        """Why these options cannot train on image rows (their extra forwards take no pixel
        inputs yet), or None."""
        unsupported = {"use_weighting": self.use_weighting, "ref_sync": self.ref_sync != "off",
                       "margin_reward_models": bool(self.margin_reward_models)}
        named = [name for name, on in unsupported.items() if on]
        return f"--set {named[0]} does not take image rows yet" if named else None

    @property
    def sync_alpha(self) -> float:
        return 1.0 if self.ref_sync == "hard" else float(self.ref_sync_alpha)


def needs_reference(components: Mapping[str, float]) -> bool:
    """Whether any component reads reference log-probs."""
    return any(n not in REFERENCE_FREE and n != SFT_COMPONENT for n in components)


def length_normalised(logps: PairLogps) -> PairLogps:
    """a = logp / max(|y|, 1) for policy and reference, token counts set to 1, so a loss that
    divides by the counts itself computes the same value again rather than logp / |y|^2."""
    chosen_tokens = logps.chosen_tokens.clamp(min=1)
    rejected_tokens = logps.rejected_tokens.clamp(min=1)

    def per(value: Tensor | None, tokens: Tensor) -> Tensor | None:
        return None if value is None else value / tokens

    return PairLogps(
        chosen=logps.chosen / chosen_tokens,
        rejected=logps.rejected / rejected_tokens,
        chosen_tokens=torch.ones_like(chosen_tokens),
        rejected_tokens=torch.ones_like(rejected_tokens),
        ref_chosen=per(logps.ref_chosen, chosen_tokens),
        ref_rejected=per(logps.ref_rejected, rejected_tokens),
        margins=logps.margins,
    )


def scored_mask(batch: Mapping[str, Tensor]) -> Tensor:
    """(2B, T) bool: response tokens that get a log-prob (the first position never does)."""
    mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
    mask[:, 0] = False
    return mask


@dataclass
class RunningMean:
    """BCO's reward shift delta: the running mean of the batch-mean implicit rewards,

        delta_n = delta_{n-1} + (x_n - delta_{n-1}) / n,   x_n = mean(beta h_w, beta h_l) over the batch,

    updated before the loss of batch n uses it. This is TRL's `RunningMoments.mean` (TRL <= 0.12
    DPOTrainer `loss_type="bco_pair"`) for its scalar updates (its count starts at 1e-24, which
    rounds away). Updated on training micro-batches only (TRL also updates on evaluation)."""

    mean: float = 0.0
    count: int = 0

    def update(self, value: float) -> float:
        self.count += 1
        self.mean += (value - self.mean) / self.count
        return self.mean


class LiveReference:
    """The TR-DPO reference: a frozen copy of the policy's weights that `sync` moves toward it.

    Full fine-tuning keeps a deep copy of the model (2x weight memory). With LoRA it keeps a copy
    of the adapter tensors only: reference = base + reference adapter, swapped into the model for
    the reference forward and swapped back (the base weights are shared).
    """

    def __init__(self, model: nn.Module, reference: nn.Module | None = None) -> None:
        self.adapter = is_peft(model)
        self.module: nn.Module | None = None
        self.tensors: dict[str, Tensor] = {}
        if self.adapter:
            if reference is not None:
                raise ValueError("ref_sync with LoRA keeps the reference as base + adapter; drop --ref-model")
            self.tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            self.module = copy.deepcopy(model) if reference is None else reference
            own = {n: p.shape for n, p in model.named_parameters()}
            theirs = {n: p.shape for n, p in self.module.named_parameters()}
            if own != theirs:
                raise ValueError("ref_sync: the reference model's parameters differ from the policy's")
            self.module.requires_grad_(False)
            self.module.eval()

    def reference_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(parameter name, reference tensor) for every synchronised parameter."""
        if self.adapter:
            yield from self.tensors.items()
        else:
            assert self.module is not None
            yield from self.module.named_parameters()

    def _pairs(self, model: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
        """(name, reference tensor, policy parameter) for every synchronised parameter."""
        params = dict(model.named_parameters())
        for name, ref in self.reference_tensors():
            yield name, ref, params[name]

    @torch.no_grad()
    def sync(self, model: nn.Module, alpha: float) -> None:
        """theta_ref <- alpha theta + (1 - alpha) theta_ref (TRL `SyncRefModelCallback`)."""
        for _, ref, param in self._pairs(model):
            ref.mul_(1.0 - alpha).add_(param.detach(), alpha=alpha)

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """Yield the module to run as the reference (eval mode, no grad)."""
        if not self.adapter:
            assert self.module is not None
            with torch.no_grad():
                yield self.module
            return
        was_training = model.training
        saved = {}
        with torch.no_grad():
            for name, ref, param in self._pairs(model):
                saved[name] = param.detach().clone()
                param.copy_(ref)
            model.eval()
            try:
                yield model
            finally:
                for name, _, param in self._pairs(model):
                    param.copy_(saved[name])
                model.train(was_training)

    def state_tensors(self) -> dict[str, Tensor]:
        """The reference weights, keyed `ref_model.<parameter name>`, for the checkpoint."""
        return {f"ref_model.{name}": ref for name, ref in self.reference_tensors()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        for name, ref in self.reference_tensors():
            key = f"ref_model.{name}"
            if key not in tensors:
                raise ValueError(f"checkpoint lacks the TR-DPO reference tensor {key!r}")
            ref.copy_(tensors[key])


@torch.no_grad()
def wpo_token_statistics(
    model: nn.Module, batch: Mapping[str, Tensor], chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Per-token log pi(y_t) and log sum_v pi(v)^2 of the policy, (2B, T) each, 0 off the
    response; one no-grad forward (dropout off), vocabulary projected `chunk_size` rows at a time."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    mask = scored_mask(batch)  # (2B, T)
    predict = mask[:, 1:]  # logits at t-1 score token t
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    was_training = model.training
    model.eval()
    try:
        parts = decoder_and_head(model)
        if parts is None:
            hidden, head = model(**inputs).logits, nn.Identity()
        else:
            decoder, head = parts
            hidden = decoder(**inputs).last_hidden_state  # (2B, T, H)
        rows = hidden[:, :-1][predict]  # (N, H)
        targets = input_ids[:, 1:][predict]  # (N,)
        logps, log_sum_sq = [], []
        for start in range(0, rows.shape[0], chunk_size):
            logits = head(rows[start : start + chunk_size]).float()  # (n, V)
            log_probs = torch.log_softmax(logits, dim=-1)
            logps.append(log_probs.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1))
            log_sum_sq.append(log_sum_squared_probs(logits))
    finally:
        model.train(was_training)
    token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    token_log_sum_sq = torch.zeros_like(token_logps)
    if logps:
        token_logps[mask] = torch.cat(logps)
        token_log_sum_sq[mask] = torch.cat(log_sum_sq)
    return token_logps, token_log_sum_sq


def margins_from_column(table, examples) -> int:
    """Copy each row's `margins` list into `example.extras['margins']`; return K (0 if absent)."""
    if not examples or "margins" not in table.rows[examples[0].row]:
        return 0
    width = None
    for example in examples:
        value = table.rows[example.row].get("margins")
        if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
            raise table.error(example.row, f"`margins` must be a list of numbers, got {value!r}")
        width = len(value) if width is None else width
        if len(value) != width:
            raise table.error(example.row, f"`margins` has {len(value)} numbers, earlier rows {width}")
        example.extras["margins"] = [float(v) for v in value]
    return width or 0


@torch.no_grad()
def margins_from_reward_models(task, paths: list[str], splits, config, device) -> None:
    """MODPO margins r_k(x, y_w) - r_k(x, y_l) of every pair under each frozen reward model,
    appended to `example.extras['margins']`; each model is freed before the next loads.

    Pairs are re-tokenised with each reward model's own tokenizer (ALGORITHMS.md §0 pitfall 4)."""
    for path in paths:
        reward_model, reward_tokenizer = load_model(
            path,
            kind="reward",
            dtype=None if config.dtype == "auto" else config.dtype,
            device=str(device),
            trust_remote_code=config.trust_remote_code,
        )
        reward_model.eval()
        for table, examples in splits.values():
            if table is None or not examples:
                continue
            scored, _ = task.tokenize(table, reward_tokenizer)
            by_row = {ex.row: ex for ex in scored}
            for start in range(0, len(examples), config.batch_size):
                chunk = examples[start : start + config.batch_size]
                batch = task.collate([by_row[ex.row] for ex in chunk], reward_tokenizer.pad_token_id)
                scores = reward_scores(
                    reward_model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
                ).float().cpu()  # (2B,)
                half = scores.shape[0] // 2
                for example, margin in zip(chunk, (scores[:half] - scores[half:]).tolist(), strict=True):
                    example.extras.setdefault("margins", []).append(margin)
        del reward_model
        gc.collect()
