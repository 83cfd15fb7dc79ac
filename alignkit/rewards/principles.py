"""Principle-following reward models (SALMON, Sun et al. 2023, "SALMON: Self-Alignment with
Instructable Reward Models"; official code github.com/IBM/SALMON).

The reward model reads written principles together with the prompt and the response, so the
principles can be changed at RL time without retraining. `principled_prompt` is THE one place
the principles enter the input: `alignkit train rm_principles` builds its training sequences
with it and `PrincipleRewardScorer` (the `rm:DIR,principles=FILE` reward) its scoring ones.

Layout (checked against IBM/SALMON prompts/salmon_reward_model_prompt_v1.txt): SALMON's RM
prompt holds the response, the instruction, then a bulleted list of principles, and reads the
score after "The quality of the output is". OUR DEVIATION: the principles come FIRST, before
the instruction, and the response follows the prompt as in every alignkit reward model, so
training and scoring share alignkit's one tokenisation of prompt + response
(`tokenize_pairwise` / `RewardModelScorer.encode`); a causal backbone read at the last token
still sees all three. A text prompt becomes

    Principles:
    - <principle 1>
    - <principle 2>

    <prompt>

and a conversational prompt gets the same principles block as a system message (prepended to
the content of an existing first system message).

Principles are given as text (used as is), a list of strings (one bullet each) or SALMON's
JSON form, a list of {"dimension": ..., "definition": ...} (bullet "dimension: definition";
SALMON's RM prompt bullets the definition alone, training/data_utils/data_utils_rm.py, and
its negative principles are the items' `negative_definition`, see `alignkit label-principles
--principle-subsets`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.rewards.scorer import RewardModelScorer

MANIFEST = "principles_rm.json"
HEADER = "Principles:"


def principle_lines(principles: Any, where: str = "principles") -> list[str]:
    """The principles as a list of one-line statements (see the module docstring for the
    accepted forms); a one-line error naming `where` for anything else or an empty set."""
    if isinstance(principles, str):
        lines = [principles.strip()] if principles.strip() else []
    elif isinstance(principles, list):
        lines = []
        for item in principles:
            if isinstance(item, dict) and isinstance(item.get("dimension"), str):
                definition = str(item.get("definition", "")).strip()
                lines.append(f"{item['dimension'].strip()}: {definition}" if definition else item["dimension"].strip())
            elif isinstance(item, str) and item.strip():
                lines.append(item.strip())
            else:
                raise ValueError(f"{where}: each principle must be a non-empty string or "
                                 f"{{'dimension': ..., 'definition': ...}}, got {item!r}")
    else:
        raise ValueError(f"{where}: principles must be text or a list of principles, got {type(principles).__name__}")
    if not lines:
        raise ValueError(f"{where}: the principles are empty")
    return lines


def format_principles(principles: Any, where: str = "principles") -> str:
    """The principles block: "Principles:" then one "- " bullet per principle (a text given
    as is, after the header)."""
    lines = principle_lines(principles, where)
    if isinstance(principles, str):
        return f"{HEADER}\n{lines[0]}"
    return HEADER + "\n" + "\n".join(f"- {line}" for line in lines)


def principled_prompt(prompt: Any, principles: Any, where: str = "principles") -> Any:
    """`prompt` with the principles block in front: a text prompt as "BLOCK\\n\\nPROMPT", a
    message list with the block as (or prepended to) its first system message.

    >>> principled_prompt("Say hi.", ["Be brief."])
    'Principles:\\n- Be brief.\\n\\nSay hi.'
    """
    block = format_principles(principles, where)
    if isinstance(prompt, str):
        return f"{block}\n\n{prompt}"
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if prompt and prompt[0].get("role") == "system":
            first = {**prompt[0], "content": f"{block}\n\n{prompt[0].get('content', '')}"}
            return [first, *prompt[1:]]
        return [{"role": "system", "content": block}, *prompt]
    raise ValueError(f"{where}: the prompt must be text or a list of messages, got {type(prompt).__name__}")


def load_principles(path: str | Path) -> Any:
    """Principles from a file: .json (a string, a list of strings or SALMON's
    [{"dimension", "definition"}] list, or {"principles": ...}), else the text of the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"principles file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"principles file {str(path)!r} is not valid JSON: {error}") from error
        if isinstance(value, dict) and "principles" in value:
            value = value["principles"]
    else:
        value = text.strip()
    principle_lines(value, f"principles file {str(path)!r}")
    return value


def resolve_principles(value: Any, where: str) -> Any:
    """A principles argument: a file (a Path, or a one-line str naming an existing file, ending
    in .json/.txt or holding a path separator) is loaded with `load_principles` (a missing one
    is an error); other text or a list is checked and returned."""
    looks_like_file = isinstance(value, str) and "\n" not in value and (
        Path(value).expanduser().is_file() or value.endswith((".json", ".txt")) or "/" in value)
    if isinstance(value, Path) or looks_like_file:
        return load_principles(value)
    principle_lines(value, where)
    return value


class PrincipleRewardScorer(RewardModelScorer):
    """A saved `rm_principles` model as a reward: each prompt gets the principles through
    `principled_prompt` (as in training), then the sequence classifier scores it.

    `principles`: a file (see `load_principles`), text or a list; the RL-time principles,
    swappable without retraining. Without it, a `principles` column of the call is used
    (one per row), else the single principle set the model was trained with (saved in
    principles_rm.json), else an error. Other keyword arguments go to `RewardModelScorer`.
    """

    def __init__(self, path: str | Path, principles: Any = None, **kwargs: Any) -> None:
        manifest_file = Path(path) / MANIFEST
        manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        self.principles = resolve_principles(principles, "principles=") if principles is not None else None
        self.default_principles = manifest.get("default_principles")
        super().__init__(path, **kwargs)  # after the principles: reference= scores with them
        self.__name__ = f"PrincipleRewardScorer({path})"

    def _principles_per_row(self, n: int, columns: dict[str, Any]) -> list[Any]:
        if self.principles is not None:
            return [self.principles] * n
        if columns.get("principles") is not None:
            return list(columns["principles"])
        if self.default_principles is not None:
            return [self.default_principles] * n
        raise ValueError(f"{self.path}: a principle-following reward model needs principles: "
                         "--reward rm:DIR,principles=FILE (or a 'principles' column)")

    def frame(self, prompts: list[Any], **columns: Any) -> list[Any]:
        """The prompts with their principles in front (`principled_prompt`), as in training."""
        rows = self._principles_per_row(len(prompts), columns)
        return [principled_prompt(p, s, f"{self.path} row {i}")
                for i, (p, s) in enumerate(zip(prompts, rows, strict=True))]

    def fit_reference(self, prompts: Any, completions: Any) -> Any:
        return super().fit_reference(self.frame(list(prompts)), completions)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> Any:
        return super().__call__(self.frame(prompts, **columns), completions)
