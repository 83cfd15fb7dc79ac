"""`--set rm_context_columns=caption,options` for reward-model tasks (Factually Augmented RLHF):
the named columns are appended to the reward model's prompt (`alignkit.data.context`, one format
for training and scoring) and recorded in `final/reward_context.json`, so `rm:DIR` scorers read
the same columns back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.data.context import CONTEXT_FILE, parse_context_columns, table_with_context


class RewardContext:
    """Mixin for a reward task (before its data mixin in the bases): `context_columns` from the
    `rm_context_columns` hyper-parameter, prompts augmented before tokenising, the columns saved
    next to the final checkpoint."""

    config: Any

    @property
    def context_columns(self) -> list[str]:
        return parse_context_columns(self.config.hparams.get("rm_context_columns"))

    def tokenize(self, table, tokenizer):
        return super().tokenize(table_with_context(table, self.context_columns), tokenizer)

    def write_final(self, final_dir: Path) -> None:
        if self.context_columns:
            manifest = {"context_columns": self.context_columns}
            (Path(final_dir) / CONTEXT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
