"""What the offline trainer optimises: one small `Task` per family (SFT, reward model,
pairwise preference losses). A task tokenises rows, collates batches, precomputes what it
caches (reference log-probs) and turns a batch into a scalar loss plus detached metrics.
The loop in `loop.py` is the same for all of them."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data import (
    PairExample,
    RankedExample,
    RowTable,
    SeqExample,
    TruncationStats,
    collate_pairs,
    collate_sequences,
    tokenize_pairwise,
    tokenize_ranked,
    tokenize_sft,
)
from alignkit.data.image_tokenize import (
    ImagePairExample,
    ImageSeqExample,
    collate_image_pairs,
    collate_image_sequences,
    tokenize_pairwise_images,
    tokenize_sft_images,
)
from alignkit.models import reward_scores, sequence_logps, token_logps
from alignkit.objectives import (
    PAIRWISE,
    PairLogps,
    combine_losses,
    ld_dpo,
    mm_dpo_beta,
    wpo_weights,
)
from alignkit.objectives.pairwise import log_ratios
from alignkit.objectives.registry import REFERENCE_FREE
from alignkit.objectives.reward_model import bradley_terry
from alignkit.training.offline.dynamic_beta import attach_reward_margins
from alignkit.training.offline.pair_metrics import (
    Metrics,
    implicit_reward_metrics,
    score_pair_metrics,
)
from alignkit.training.offline.pairwise_options import (
    SFT_COMPONENT,
    LiveReference,
    PairwiseOptions,
    RunningMean,
    length_normalised,
    margins_from_column,
    margins_from_reward_models,
    needs_reference,
    scored_mask,
    wpo_token_statistics,
)
from alignkit.training.offline.reference import attach_reference_logps
from alignkit.training.offline.reward_context import RewardContext
from alignkit.training.run import distributed
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.values import hparam_type_error


def accepted_hparams(fn: Callable[..., Any]) -> dict[str, Any]:
    """Keyword hyper-parameters of a loss function with their defaults."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind is not p.VAR_POSITIONAL}


def check_hparams(algorithm: str, given: dict[str, Any], accepted: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(
            f"{algorithm}: unknown hyper-parameter(s) {unknown}; "
            f"accepted: {sorted(accepted) or 'none'}"
        )
    wrong = [hparam_type_error(k, v, accepted[k]) for k, v in given.items()]  # types of the defaults
    if any(wrong):
        raise ValueError(f"{algorithm}: {next(w for w in wrong if w)}")


def scored_tokens(batch: dict[str, Tensor]) -> Tensor:
    """Response tokens a token-mean loss averages over: response & attention, t >= 1."""
    return (batch["response_mask"].bool() & batch["attention_mask"].bool())[:, 1:].sum()


def completion_nll(logps: Tensor, counts: Tensor) -> tuple[Tensor, Metrics]:
    """The token-mean NLL L = -sum_b logp_b / sum_b n_b of sequence log-prob sums `logps` (B,)
    over `counts` (B,) scored tokens, and its metrics. `logps/completion` is the mean over rows
    of each row's per-token log-prob: a row mean inside a token-mean loss, so under torchrun
    ranks weigh it by their rows (`Weighted`), not by their tokens as they do the loss."""
    loss = -logps.sum() / counts.sum().clamp(min=1)
    per_row = (logps / counts.clamp(min=1)).mean().detach()
    return loss, {"loss": loss.detach(), "logps/completion": distributed.Weighted(per_row, len(logps))}


def tokenize_options(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments every `tokenize_*` call takes from the training config."""
    return {
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "chat": bool(config.chat_template),
    }


class SequenceData:
    """Tokenising and collating prompt + completion rows (SFT, unpaired, pointwise tasks)."""

    config: TrainConfig

    def tokenize(self, table: RowTable, tokenizer) -> tuple[list[SeqExample], TruncationStats]:
        if hasattr(tokenizer, "image_processor"):  # a VLM processor: rows with images
            return tokenize_sft_images(table, tokenizer, max_length=self.config.max_length)
        return tokenize_sft(table, tokenizer, **tokenize_options(self.config))

    def length(self, example: SeqExample) -> int:
        return example.length

    def collate(self, examples: list[SeqExample], pad_id: int) -> dict[str, Tensor]:
        if examples and isinstance(examples[0], ImageSeqExample):
            return collate_image_sequences(examples, pad_id)
        return collate_sequences(examples, pad_id)


class RankedData:
    """Tokenising ranked rows (prompt + completions + scores); each user collates its own way."""

    config: TrainConfig

    def tokenize(self, table: RowTable, tokenizer) -> tuple[list[RankedExample], TruncationStats]:
        return tokenize_ranked(table, tokenizer, **tokenize_options(self.config))

    def length(self, example: RankedExample) -> int:
        return example.length


@dataclass
class SFTTask(SequenceData):
    """Supervised fine-tuning: NLL on completion tokens only (prompt tokens masked).

    L = -sum_t m_t log p(y_t | x, y_<t) / sum_t m_t  (token mean over the micro-batch)
    """

    config: TrainConfig
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("sft",)
    needs_reference: bool = False

    def __post_init__(self) -> None:
        check_hparams("sft", self.config.hparams, {})

    def images_problem(self) -> str | None:  # the loop's hook: None, image rows train
        return None

    loss_tokens = staticmethod(scored_tokens)  # a token mean: data parallelism normalises by tokens

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        logps, counts = sequence_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            chunk_size=self.config.logp_chunk_size,
            pixel_inputs=batch.get("pixel_inputs"),
        )
        return completion_nll(logps, counts)


class PairData:
    """Tokenising and collating preference pairs: shared by reward models and pairwise losses."""

    config: TrainConfig

    def tokenize(self, table: RowTable, tokenizer) -> tuple[list[PairExample], TruncationStats]:
        if hasattr(tokenizer, "image_processor"):  # a VLM processor: rows with images
            return tokenize_pairwise_images(table, tokenizer, max_length=self.config.max_length)
        return tokenize_pairwise(table, tokenizer, **tokenize_options(self.config))

    def length(self, example: PairExample) -> int:
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))

    def collate(self, examples: list[PairExample], pad_id: int) -> dict[str, Tensor]:
        if examples and isinstance(examples[0], ImagePairExample):
            return collate_image_pairs(examples, pad_id)
        return collate_pairs(examples, pad_id)

    def identical_pair(self, example: PairExample) -> bool:
        """Whether chosen and rejected are the same tokens after truncation (they share the
        prompt): such a pair states no preference (`alignkit.training.run.degenerate`)."""
        return example.chosen_ids == example.rejected_ids


@dataclass
class RewardModelTask(RewardContext, PairData):
    """Bradley-Terry reward model with optional margin column and centering coefficient.

    L = -log sigma(r(x, y_w) - r(x, y_l) - m) + c (r_w + r_l)^2, scores read at the last
    real token of prompt + response. `rm_context_columns`: ground-truth columns appended to the
    RM's prompt (Factually Augmented RLHF; `RewardContext`).
    """

    config: TrainConfig
    model_kind: str = "reward"
    data_kinds: tuple[str, ...] = ("pairwise",)
    needs_reference: bool = False
    center_coef: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        check_hparams("rm", self.config.hparams, {"center_rewards_coefficient": 0.0, "rm_context_columns": None})
        self.center_coef = float(self.config.hparams.get("center_rewards_coefficient", 0.0))

    def images_problem(self) -> str | None:
        return None

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"],
                               pixel_inputs=batch.get("pixel_inputs"))
        half = scores.shape[0] // 2
        chosen, rejected = scores[:half], scores[half:]
        per_pair = bradley_terry(chosen, rejected, batch.get("margin"), self.center_coef)
        loss = per_pair.mean()
        return loss, score_pair_metrics(loss, chosen, rejected)


@dataclass
class PairwiseTask(PairData):
    """Any loss from `alignkit.objectives.PAIRWISE`, chosen and rejected in one forward.

    Reference log-probs are computed once before training and travel with each example, so no
    reference model stays in memory while training (unless `ref_sync` makes the reference live).

    Family-wide options, set like hyper-parameters (`--set name=value`) and consumed here, never
    passed to the loss (equations and extra forwards in `PairwiseOptions`):

    - `length_normalize=true`: logp / |y| for policy and reference (no extra forward);
    - `ref_sync=soft|hard`, `ref_sync_alpha=0.6`, `ref_sync_steps=512`: TR-DPO live reference
      (+1 no-grad forward per micro-batch; reference weights saved in checkpoints);
    - `ld_alpha=A`: LD-DPO length desensitisation of policy and reference sums (no extra forward);
    - `use_weighting=true`: WPO per-pair weights (+1 no-grad forward per micro-batch);
    - `loss_weights='{dpo: 1.0, sft: 0.5}'`: L = sum_k w_k mean_i L_k,i; shared names such as
      `beta` apply to every component that accepts them; `sft` = -logp(y_w) / |y_w|;
    - `margin_reward_models='[dir1, dir2]'` (or a `margins` list column): MODPO margins (B, K).

    `bco` shifts its rewards by delta = the running mean of the batch-mean implicit rewards
    (TRL's BCO), kept here and checkpointed, unless `delta` is set to a constant.
    """

    config: TrainConfig
    loss_name: str = "dpo"
    model_kind: str = "causal_lm"
    data_kinds: tuple[str, ...] = ("pairwise",)
    hparams: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.options, given = PairwiseOptions.split(self.config.hparams)
        self.weights = self.options.components(self.loss_name)
        self.loss_fn = PAIRWISE[self.loss_name]
        accepted: dict[str, dict[str, Any]] = {
            name: accepted_hparams(PAIRWISE[name]) for name in self.weights if name != SFT_COMPONENT
        }
        option_names = {f.name: None for f in dataclasses.fields(PairwiseOptions)}
        check_hparams(
            self.loss_name, given, {k: v for a in accepted.values() for k, v in a.items()} | option_names
        )
        self.component_hparams = {
            name: {k: v for k, v in given.items() if k in names} for name, names in accepted.items()
        }
        defaults = accepted_hparams(self.loss_fn)
        self.hparams = {k: v for k, v in defaults.items() if v is not inspect.Parameter.empty}
        self.hparams.update({k: v for k, v in given.items() if k in defaults})
        self.beta = float(given.get("beta", self.hparams.get("beta", 1.0)))
        if "modpo" in self.weights and "weights" not in given:
            raise ValueError("modpo needs objective weights: --set weights='[w_0, w_1, ..., w_K]'")
        if self.options.ref_sync != "off" and not needs_reference(self.weights):
            raise ValueError(f"ref_sync updates a reference model; {sorted(self.weights)} use none")
        if self.options.use_weighting and "aot" in self.weights:
            raise ValueError("use_weighting (WPO) weights pairs; aot's per-row losses are batch-coupled")
        if self.options.dynamic_beta is not None and set(self.weights) != {"dpo"}:
            raise ValueError(f"dynamic_beta (MM-DPO) scales dpo's beta; {sorted(self.weights)} is not plain dpo")
        if self.options.margin_reward_models and "modpo" not in self.weights:
            raise ValueError("margin_reward_models feed MODPO's margins; train modpo to use them")
        self.bco_delta = RunningMean() if "bco" in self.weights and "delta" not in given else None
        self.live_reference: LiveReference | None = None

    def images_problem(self) -> str | None:
        return self.options.images_problem()

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs are cached before training (not with a live reference)."""
        return needs_reference(self.weights) and self.options.ref_sync == "off"

    @property
    def reference_key(self) -> dict[str, Any]:
        """What besides the data and model changes cached reference values (the cache checks it)."""
        return {} if self.options.ld_alpha is None else {"ld_alpha": float(self.options.ld_alpha)}

    # -- hooks called by the offline loop ------------------------------------------------------
    def prepare(self, model, tokenizer, splits: dict[str, tuple[Any, list]], run_dir) -> None:
        """MODPO margins (a `margins` data column or frozen reward models), then the reference
        log-prob cache (`attach_reference_logps`) unless the reference is live or absent."""
        if self.options.dynamic_beta is not None:  # MM-DPO's reward margins, before the reference cache
            attach_reward_margins(self, model, splits)
        if "modpo" in self.weights:
            self.prepare_margins(model, splits)
        if self.needs_reference:
            train, evaluation = splits["train"][1], splits["eval"][1]
            attach_reference_logps(self, model, tokenizer, train, evaluation, self.config, run_dir)

    def prepare_margins(self, model, splits: dict[str, tuple[Any, list]]) -> None:
        from_column = [margins_from_column(t, ex) for t, ex in splits.values() if t is not None]
        if self.options.margin_reward_models:
            if any(from_column):
                raise ValueError("margins come from either the `margins` column or margin_reward_models")
            device = next(model.parameters()).device
            margins_from_reward_models(self, self.options.margin_reward_models, splits, self.config, device)
        elif not any(from_column):
            raise ValueError("modpo needs margins: a `margins` data column or --set margin_reward_models")

    def attach_model(self, model) -> None:
        """TR-DPO: keep the live reference (a copy of the initial weights, or --ref-model)."""
        if self.options.ref_sync == "off":
            return
        reference = None
        if self.config.ref_model:
            from alignkit.merge.spec import resolve_model_and_tokenizer

            reference, _ = resolve_model_and_tokenizer(
                self.config.ref_model,
                dtype=None if self.config.dtype == "auto" else self.config.dtype,
                device=str(next(model.parameters()).device),
                trust_remote_code=self.config.trust_remote_code,
            )
        self.live_reference = LiveReference(model, reference)

    def on_step_end(self, step: int, model) -> None:
        if self.live_reference is not None and step % int(self.options.ref_sync_steps) == 0:
            self.live_reference.sync(model, self.options.sync_alpha)

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        state = {} if self.bco_delta is None else {"bco_delta": dataclasses.asdict(self.bco_delta)}
        tensors = {} if self.live_reference is None else self.live_reference.state_tensors()
        return state, tensors

    def restore_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        if self.bco_delta is not None:
            if "bco_delta" not in state:
                raise ValueError("the checkpoint has no BCO running mean (was it written by bco?)")
            self.bco_delta = RunningMean(**state["bco_delta"])
        if self.live_reference is not None:
            self.live_reference.load_state_tensors(tensors)

    # -- batches and the loss ------------------------------------------------------------------
    def collate(self, examples: list[PairExample], pad_id: int) -> dict[str, Tensor]:
        """`collate_pairs`, plus `margins` (B, K) float32 when the examples carry them."""
        batch = PairData.collate(self, examples, pad_id)
        if "margins" in examples[0].extras:
            batch["margins"] = torch.tensor([ex.extras["margins"] for ex in examples], dtype=torch.float32)
        return batch

    def summed_logps(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(the sums the loss sees, plain sums, token counts), each (2B,): LD-DPO sums when
        `ld_alpha` is set (per-token log-probs from the same forward), else plain sums."""
        ids, attention, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        options = {"chunk_size": self.config.logp_chunk_size, "pixel_inputs": batch.get("pixel_inputs")}
        if self.options.ld_alpha is None:
            sums, counts = sequence_logps(model, ids, attention, response, **options)
            return sums, sums, counts
        per_token = token_logps(model, ids, attention, response, **options)  # (2B, T)
        mask = scored_mask(batch)
        half = ids.shape[0] // 2
        ld_chosen, ld_rejected = ld_dpo(
            per_token[:half], mask[:half], per_token[half:], mask[half:], float(self.options.ld_alpha)
        )
        return torch.cat([ld_chosen, ld_rejected]), per_token.sum(-1), mask.sum(-1).float()

    def forward_pairs(self, model, batch: dict[str, Tensor]) -> tuple[PairLogps, Tensor]:
        """(PairLogps as the loss sees them before length normalisation, plain chosen sums (B,))."""
        half = batch["input_ids"].shape[0] // 2
        ref_chosen, ref_rejected = batch.get("ref_chosen"), batch.get("ref_rejected")
        if self.live_reference is not None:
            with self.live_reference.active(model) as reference:
                ref_sums, _, _ = self.summed_logps(reference, batch)
            ref_chosen, ref_rejected = ref_sums[:half], ref_sums[half:]
        sums, plain, counts = self.summed_logps(model, batch)
        logps = PairLogps(
            chosen=sums[:half],
            rejected=sums[half:],
            chosen_tokens=counts[:half],
            rejected_tokens=counts[half:],
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            margins=batch.get("margins"),
        )
        return logps, plain[:half]

    def pair_logps(self, model, batch: dict[str, Tensor]) -> PairLogps:
        return self.forward_pairs(model, batch)[0]

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        logps, plain_chosen = self.forward_pairs(model, batch)
        sft_nll = -plain_chosen / logps.chosen_tokens.clamp(min=1)  # (B,)
        if self.options.length_normalize:
            logps = length_normalised(logps)
        hparams = {name: dict(values) for name, values in self.component_hparams.items()}
        extra: Metrics = {}
        if self.bco_delta is not None:
            if model.training:  # reward = beta h, mean over the batch's 2B responses
                bco_beta = float(hparams["bco"].get("beta", accepted_hparams(PAIRWISE["bco"])["beta"]))
                chosen_logratio, rejected_logratio = log_ratios(logps)
                rewards = bco_beta * torch.cat([chosen_logratio, rejected_logratio]).detach()
                self.bco_delta.update(float(distributed.global_mean(rewards)))
            hparams["bco"]["delta"] = self.bco_delta.mean
            extra["bco/delta"] = torch.tensor(self.bco_delta.mean)
        if self.options.dynamic_beta is not None:  # MM-DPO: one beta per pair from its reward margin
            hparams["dpo"]["beta"] = mm_dpo_beta(batch["reward_margin"], self.beta, float(self.options.dynamic_beta),
                                                 float(self.options.dynamic_beta_k))
            extra["dynamic_beta/mean"] = hparams["dpo"]["beta"].mean()
        pairwise = {name: w for name, w in self.weights.items() if name != SFT_COMPONENT}
        per_pair = combine_losses(logps, pairwise, hparams) if pairwise else torch.zeros_like(sft_nll)
        if SFT_COMPONENT in self.weights:
            per_pair = per_pair + self.weights[SFT_COMPONENT] * sft_nll
        if len(self.weights) > 1:
            with torch.no_grad():
                for name in self.weights:
                    term = sft_nll if name == SFT_COMPONENT else PAIRWISE[name](logps, **hparams[name])
                    extra[f"loss/{name}"] = term.mean()
        if self.options.use_weighting:
            weights = self.wpo_weights(model, batch)
            per_pair = per_pair * weights
            extra["wpo/weight"] = weights.mean()
        loss = per_pair.mean()
        return loss, {**self.pair_metrics(loss, logps), **extra}

    def wpo_weights(self, model, batch: dict[str, Tensor]) -> Tensor:
        """WPO weights w(y_w) w(y_l) (B,) from one extra no-grad forward of the policy."""
        token_logps_, log_sum_sq = wpo_token_statistics(model, batch, self.config.logp_chunk_size)
        mask = scored_mask(batch)
        half = mask.shape[0] // 2
        return wpo_weights(
            token_logps_[:half], mask[:half], token_logps_[half:], mask[half:],
            log_sum_sq[:half], log_sum_sq[half:],
        )

    def pair_metrics(self, loss: Tensor, logps: PairLogps) -> Metrics:
        return implicit_reward_metrics(loss, logps, self.beta)

    @torch.no_grad()
    def reference_logps(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Reference (chosen, rejected) sums (B,) each, for the cache (LD-DPO sums if ld_alpha)."""
        sums, _, _ = self.summed_logps(model, batch)
        half = sums.shape[0] // 2
        return sums[:half], sums[half:]


def make_task(config: TrainConfig):
    """The task behind an algorithm name."""
    from alignkit.training.run.registry import ALGORITHMS

    if config.algorithm not in ALGORITHMS:
        known = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown algorithm {config.algorithm!r}; known: {known}")
    return ALGORITHMS[config.algorithm].make_task(config)


def _register_offline_family() -> None:
    from functools import partial

    from alignkit.training.run.registry import (
        AlgorithmSpec,
        first_docstring_line,
        register_algorithm,
    )

    register_algorithm(AlgorithmSpec(
        "sft", "sft", "prompt+completion | messages", "policy",
        "Supervised fine-tuning (Ouyang et al. 2022)", SFTTask))
    register_algorithm(AlgorithmSpec(
        "rm", "reward", "prompt+chosen+rejected [+margin]", "reward model",
        "Bradley-Terry reward model (Ouyang et al. 2022)", RewardModelTask))
    for name, fn in PAIRWISE.items():
        models = "policy" if name in REFERENCE_FREE else "policy (+ reference log-probs cached once)"
        register_algorithm(AlgorithmSpec(
            name, "pairwise", "prompt+chosen+rejected", models, first_docstring_line(fn),
            partial(PairwiseTask, loss_name=name)))


_register_offline_family()
