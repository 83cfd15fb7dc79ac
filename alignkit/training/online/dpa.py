"""Directional preference alignment (Wang et al. 2024, "Arithmetic Control of LLMs for Diverse
User Preferences: Directional Preference Alignment with Multi-Objective Rewards"): the `dpa`
preset, ALGORITHMS.md 2.18 and the addendum's section 4.

A user preference is a unit vector v = (cos theta, sin theta) over two reward attributes (the
paper's helpfulness and verbosity). Each prompt of a step gets a direction, written into the
system prompt as integer weights w = round(100 v):

    "... Your response should maximize weighted rating = helpfulness*{w_1} + verbosity*{w_2}"

(the released template's wording, `DPA_SYSTEM`); the policy samples under that prompt, a
multi-objective reward r(x, y) = (r_1, r_2) (an `rm_multi` model, or a function returning two
attribute scores per sample) is scalarised as R_v = v . r, and rejection-sampling fine-tuning
keeps each prompt's best sample under R_v (the loop's best_of_n filter and sft objective),
conditioned on its system prompt. At inference any direction is written the same way
(`system_prompt`).

Pinned by the official README/model card: the template, R_v = v . r, the best-of-n SFT loop
shape, directions with w_1 >= 71 (|theta| <= 45 degrees, negative theta allowed). Not pinned
(documented choices here): theta uniform on [-dpa_max_angle, dpa_max_angle] (45), drawn per
prompt from (seed, step, stream position); n = group_size (8).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import Tensor

from alignkit.data import RowTable, tokenize_prompts

DPA_SYSTEM = ("You are a helpful, respectful and honest assistant. Your response should maximize weighted "
              "rating = {first}*{w_first} + {second}*{w_second}")
"""The system prompt of DPA (RLHFlow/DPA-v1-Mistral-7B's model card wording after the first sentence)."""
DIRECTION_COLUMN = "dpa_direction"
"""The reward column holding each sample's direction (v_1, v_2)."""


def direction(theta_degrees: float) -> tuple[float, float]:
    """v = (cos theta, sin theta), a unit vector."""
    radians = math.radians(theta_degrees)
    return math.cos(radians), math.sin(radians)


def system_prompt(theta_degrees: float, attributes: tuple[str, str]) -> str:
    """The DPA system prompt for direction theta: weights round(100 cos), round(100 sin)."""
    v = direction(theta_degrees)
    return DPA_SYSTEM.format(first=attributes[0], second=attributes[1], w_first=round(100 * v[0]),
                             w_second=round(100 * v[1]))


def draw_angle(seed: int, step: int, round_: int, position: int, max_angle: float) -> float:
    """theta ~ U[-max_angle, max_angle] degrees, a function of (seed, step, round, position)."""
    return random.Random(f"dpa:{seed}:{step}:{round_}:{position}").uniform(-max_angle, max_angle)


def projected(attributes: Tensor, directions: Tensor) -> Tensor:
    """R_v = v . r per sample: attributes (N, 2), directions (N, 2) -> (N,)."""
    return (attributes.float() * directions.float()).sum(-1)


def conditioned_row(row: dict[str, Any], text: str) -> dict[str, Any]:
    """The prompt row with the system prompt `text`: a system message first for a
    conversational prompt, else the text and a blank line before the prompt."""
    from alignkit.rewards.runner import conversational_prompt

    messages = conversational_prompt(row)
    if messages is not None:
        return {"prompt": [{"role": "system", "content": text}, *messages]}
    return {"prompt": f"{text}\n\n{row['prompt']}"}


class DirectionalPrompts:
    """The step's prompts, each with a drawn direction in its system prompt."""

    def __init__(self, rows: list[dict], tokenizer, *, attributes: tuple[str, str], max_angle: float,
                 max_prompt_length: int | None, chat: bool, seed: int) -> None:
        self.rows, self.tokenizer, self.attributes = rows, tokenizer, attributes
        self.max_angle, self.max_prompt_length, self.chat, self.seed = max_angle, max_prompt_length, chat, seed

    def prompts(self, indices: list[int], positions: list[int], step: int, round_: int):
        """(token ids per prompt, (B, 2) directions) for rows `indices` at stream `positions`."""
        angles = [draw_angle(self.seed, step, round_, p, self.max_angle) for p in positions]
        rows = [conditioned_row(self.rows[i], system_prompt(a, self.attributes)) for i, a in zip(indices, angles,
                                                                                                strict=True)]
        ids, _ = tokenize_prompts(RowTable(rows), self.tokenizer, max_prompt_length=self.max_prompt_length,
                                  chat=self.chat)
        return ids, torch.tensor([direction(a) for a in angles])


class DirectionalReward:
    """R_v = v . r from a two-attribute reward: `attributes(prompts, completions, **columns)`
    gives (N, 2); each row's v comes in the `dpa_direction` column."""

    def __init__(self, attributes) -> None:
        self.attributes = attributes

    def __call__(self, prompts, completions, **columns) -> Tensor:
        directions = torch.as_tensor(columns[DIRECTION_COLUMN], dtype=torch.float32)
        scores = torch.as_tensor(self.attributes(prompts, completions, **columns), dtype=torch.float32)
        if scores.shape != directions.shape:
            raise ValueError(f"dpa: the reward must give two attribute scores per sample, shape ({len(completions)}, "
                             f"2); got {tuple(scores.shape)}")
        return projected(scores, directions)


def rm_multi_attributes(directory: str, names: tuple[str, str]):
    """The two named attributes of an `rm_multi` model, as an attributes function."""
    from alignkit.rewards.multi_objective import MultiObjectiveScorer

    scorer = MultiObjectiveScorer(directory)
    missing = [n for n in names if n not in scorer.attributes]
    if missing:
        raise ValueError(f"dpa_attributes: {directory} has no attribute {missing[0]!r}; it has {scorer.attributes}")
    columns = [scorer.attributes.index(n) for n in names]

    def attributes(prompts, completions, **_):
        return scorer.scores(prompts, completions).attributes[:, columns]

    return attributes
