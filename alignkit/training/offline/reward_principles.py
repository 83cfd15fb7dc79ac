"""`rm_principles`: a principle-following (instructable) reward model, SALMON (Sun et al.
2023, "SALMON: Self-Alignment with Instructable Reward Models", github.com/IBM/SALMON).

Data: pairwise rows (prompt, chosen, rejected) plus a `principles` column (text, a list of
strings or SALMON's [{"dimension", "definition"}] list): the pair's preference holds UNDER
those principles, so the same two responses may appear twice with opposite preferences under
opposite principles. Each prompt is rewritten by `alignkit.rewards.principles.principled_prompt`
(the function the scorer uses too), then the model trains as `rm` does: Bradley-Terry
L = -log sigma(r(p, x, y_w) - r(p, x, y_l) - m) + c (r_w + r_l)^2 (`bradley_terry`; SALMON's
RM is trained with the same pairwise loss, training/models/reward_model.py).

final/principles_rm.json marks the directory (so `rm:DIR` loads a `PrincipleRewardScorer`)
and keeps the principle set of the training data when every row had the same one
(`default_principles`, used when no principles are given at scoring time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from alignkit.data import RowTable, split_implicit_prompt
from alignkit.rewards.principles import MANIFEST, principled_prompt
from alignkit.training.offline.reward import register_reward_algorithms, resolve_hparams
from alignkit.training.offline.tasks import RewardModelTask


@dataclass
class PrincipleRewardTask(RewardModelTask):
    """Bradley-Terry RM on principles + prompt + response (see the module docstring)."""

    principle_sets: dict[str, Any] | None = field(init=False, default=None)
    """The distinct principle sets of the training data (the first table tokenised; the
    offline loop tokenises the training table before the held-out one)."""

    def __post_init__(self) -> None:
        self.hparams = resolve_hparams("rm_principles", self.config, {"center_rewards_coefficient": 0.0})
        self.center_coef = float(self.hparams["center_rewards_coefficient"])

    def tokenize(self, table: RowTable, tokenizer):
        rows, sets = [], {}
        for i, raw in enumerate(table.rows):
            if raw.get("principles") is None:
                raise table.error(i, "rm_principles needs a 'principles' column (text or a list of principles)")
            row = split_implicit_prompt(raw)
            try:
                prompt = principled_prompt(row["prompt"], raw["principles"], "column 'principles'")
            except ValueError as error:
                raise table.error(i, str(error)) from None
            sets.setdefault(json.dumps(raw["principles"], sort_keys=True), raw["principles"])
            rows.append({**row, "prompt": prompt})
        if self.principle_sets is None:
            self.principle_sets = sets
        return super().tokenize(RowTable(rows, list(table.origins)), tokenizer)

    def write_final(self, final_dir) -> None:
        sets = list((self.principle_sets or {}).values())
        manifest = {
            "format": "alignkit.rewards.principles.principled_prompt",
            "principle_sets_in_training": len(sets),
            "default_principles": sets[0] if len(sets) == 1 else None,
        }
        (final_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _register() -> None:
    register_reward_algorithms([
        (
            "rm_principles",
            "prompt+chosen+rejected+principles",
            "principle-following reward model",
            "SALMON instructable reward model (Sun et al. 2023)",
            PrincipleRewardTask,
        ),
    ])


_register()
