"""`rm_seq2seq`: a generative reward model trained with sequence MLE on preference pairs
(Zhou et al. 2024; maths in `alignkit.objectives.seq2seq_rm`, scoring in
`alignkit.rewards.seq2seq`).

Each pair (prompt, chosen, rejected) gives two SFT rows for a causal LM: the correction mapping
src(prompt, rejected) -> chosen and the identity mapping src(prompt, chosen) -> chosen
(`identity_mapping=false` drops the second). `final/` is the LM plus `seq2seq_rm.json` (the
template and the token scores), loadable as `--reward rm:DIR` / `--reward-model DIR`, which
gives PPO per-token rewards on the sampled response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from alignkit.data import RowTable, SeqExample, TruncationStats, tokenize_sft
from alignkit.models import token_logps
from alignkit.objectives.seq2seq_rm import sequence_mle
from alignkit.rewards.seq2seq import (
    DEFAULT_TEMPLATE,
    MANIFEST,
    check_template,
    render_source,
    response_text,
)
from alignkit.training.offline.reward import RewardTask, register_reward_algorithms, resolve_hparams
from alignkit.training.offline.tasks import Metrics, SequenceData, scored_tokens
from alignkit.training.run.distributed import Weighted

SEQ2SEQ_DEFAULTS: dict[str, Any] = {
    "template": DEFAULT_TEMPLATE,
    "identity_mapping": True,
    "match_reward": 1.0,
    "mismatch_reward": -1.0,
}


def _is_response(value: Any) -> bool:
    return (isinstance(value, str) and bool(value)) or (isinstance(value, list) and bool(value)
                                                        and isinstance(value[-1], dict) and "content" in value[-1])


@dataclass
class Seq2SeqRewardTask(RewardTask, SequenceData):
    """Seq2seq RM (Zhou et al. 2024): token-mean NLL of the chosen response after
    src(prompt, rejected) and after src(prompt, chosen). Logs `nll/correction`, `nll/identity`."""

    model_kind: str = "causal_lm"

    def __post_init__(self) -> None:
        self.hparams = resolve_hparams("rm_seq2seq", self.config, SEQ2SEQ_DEFAULTS)
        check_template(self.hparams["template"], "rm_seq2seq")
        if float(self.hparams["match_reward"]) <= float(self.hparams["mismatch_reward"]):
            raise ValueError(f"rm_seq2seq: match_reward ({self.hparams['match_reward']}) must exceed "
                             f"mismatch_reward ({self.hparams['mismatch_reward']})")

    def tokenize(self, table: RowTable, tokenizer) -> tuple[list[SeqExample], TruncationStats]:
        rows, origins = [], []
        template = self.hparams["template"]
        for i, row in enumerate(table.rows):
            for column in ("prompt", "chosen", "rejected"):
                value = row.get(column)
                if column == "prompt" and not isinstance(value, str | list):
                    raise table.error(i, "'prompt' must be a string or a list of messages")
                if column != "prompt" and not _is_response(value):
                    raise table.error(i, f"'{column}' must be a non-empty string or messages ending in one with content")
            target = response_text(row["chosen"])
            sources = [(render_source(template, row["prompt"], row["rejected"]), 1.0)]
            if self.hparams["identity_mapping"]:
                sources.append((render_source(template, row["prompt"], row["chosen"]), 0.0))
            for source, is_correction in sources:
                rows.append({"prompt": source, "completion": target, "is_correction": is_correction})
                origins.append(table.origins[i])
        # plain text, never the chat template: the scorer renders its input the same way
        return tokenize_sft(RowTable(rows, origins), tokenizer, max_length=self.config.max_length,
                            max_prompt_length=self.config.max_prompt_length, chat=False)

    loss_tokens = staticmethod(scored_tokens)  # a token mean, like SFT

    def loss(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        per_token = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                chunk_size=self.config.logp_chunk_size)  # (B, T)
        mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
        mask[:, 0] = False
        loss = sequence_mle(per_token, mask)
        metrics: Metrics = {"loss": loss.detach()}
        correction = batch["is_correction"].to(mask.device).bool().unsqueeze(1)
        for name, rows in (("correction", correction), ("identity", ~correction)):
            part = mask & rows
            metrics[f"nll/{name}"] = Weighted(sequence_mle(per_token.detach(), part), part.sum())
        return loss, metrics

    def write_final(self, final_dir) -> None:
        manifest = {key: self.hparams[key] for key in ("template", "match_reward", "mismatch_reward")}
        manifest.update(identity_mapping=self.hparams["identity_mapping"], max_length=self.config.max_length)
        (final_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


register_reward_algorithms([(
    "rm_seq2seq", "prompt+chosen+rejected", "causal LM (generative RM)",
    "Seq2seq reward modelling (Zhou et al. 2024, Sequence to Sequence Reward Modeling)", Seq2SeqRewardTask,
)])
