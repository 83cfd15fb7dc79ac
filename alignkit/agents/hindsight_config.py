"""RLHS's settings: the YAML file behind `--reward rlhs:CONFIG.yaml`, checked key by key.

A minimal file names the simulator; everything else has a default:

    simulator: runs/world-model/final   # any HF causal LM directory, a hub id or smollm2-135m
    judge: yes_no                       # or any reward spec: vader, rm:DIR, file.py:function
    horizon: 48                         # tokens of consequence simulated per sample
    n_simulations: 2                    # simulations per response; the reward is their mean
    foresight: true                     # also log the judge's score without the simulation

Paths are taken as given (relative to the working directory), as every other flag's are.
`HindsightConfig` checks each field on construction, so Python users get the same one-line
errors as the YAML file's (which add the file's name).
"""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JUDGE_YES_NO = "yes_no"
"""The judge that asks the simulator itself a yes/no question and reads P(yes) from its logits."""

OUTCOME_PREFIX = "\n\nThe user acted on the assistant's answer. What happened next:"
"""Joins the response and its simulated consequence in every text a judge sees."""

DEFAULT_TEMPLATE = "{conversation}" + OUTCOME_PREFIX
"""What the simulator continues: the conversation, then the outcome prefix."""

FACTS_TEMPLATE = "Facts the user did not know: {facts}\n\n" + DEFAULT_TEMPLATE
"""The default template when `facts_column` names privileged facts for the simulator."""

TEMPLATE_FIELDS = ("conversation", "prompt", "response", "facts")

QUESTION_SUFFIX = "\n\nQuestion: {question}\nAnswer:"
"""Appended to the text the yes/no judge reads; the answer token comes next."""


@dataclass(frozen=True)
class HindsightConfig:
    """Settings of `HindsightReward` (alignkit/agents/hindsight.py); each field's docstring is
    its YAML key's meaning."""

    simulator: str
    """The world model that rolls the consequences forward: a causal-LM directory, hub id or
    `smollm2-135m`."""
    judge: str = JUDGE_YES_NO
    """`yes_no` (P(yes) of the simulator asked `question`) or a reward spec scoring the
    hindsight text (`vader`, `rm:DIR`, `file.py:function`, `module:function`)."""
    horizon: int = 48
    """Most tokens of consequence simulated per sample (a simulation also ends at EOS)."""
    n_simulations: int = 1
    """Simulations per response; the reward is the mean of the judge's scores over them."""
    temperature: float = 1.0
    """Sampling temperature of the simulator (0: greedy, then n_simulations must be 1)."""
    top_p: float = 1.0
    """Nucleus sampling of the simulator."""
    seed: int = 0
    """Seed of the simulations: same inputs and seed, same rewards."""
    template: str = DEFAULT_TEMPLATE
    """The text the simulator continues; fields {conversation} ("User: ...\\nAssistant: ..."),
    {prompt} (the prompt text; a conversation rendered "Role: content" a line), {response},
    {facts}. Left at the default with a `facts_column`, it becomes `FACTS_TEMPLATE`."""
    outcome_prefix: str = OUTCOME_PREFIX
    """Between the response and the consequence in the text a judge sees."""
    question: str = "Was the user satisfied with the outcome? Answer yes or no."
    """The yes/no judge's question after the hindsight text."""
    foresight_question: str = "Will the user be satisfied with the outcome? Answer yes or no."
    """The yes/no judge's question after the bare conversation (the foresight score)."""
    yes: str = " yes"
    """The answer whose probability is the score; must be one token of the simulator's tokenizer."""
    no: str = " no"
    """The other answer: P(yes) = p(yes) / (p(yes) + p(no)); one token."""
    foresight: bool = False
    """Also score each response with the same judge without the simulation, logged as
    `rlhs/foresight` beside `rlhs/hindsight` (costs one more judge call)."""
    facts_column: str | None = None
    """A dataset column of facts the simulator sees and the judge does not (the paper's
    simulator knows the true outcome-relevant state); fills {facts}."""
    batch_independent: bool = True
    """Each row simulated on its own, its noise seeded from its own text: a row's reward does
    not depend on the batch around it. False: one batched call per batch (faster on a GPU;
    a row's noise then depends on its position)."""
    max_context: int = 1024
    """Most tokens of a simulator input (prompt + horizon); longer inputs keep their end and
    are counted in the log."""
    batch_size: int = 32
    """Most rows the simulator decodes or scores at once."""
    device: str | None = None
    """Device of the simulator (default: cuda when available, else cpu)."""
    dtype: str | None = None
    """float32, bfloat16 or float16 (default: bf16 on a GPU that has it, else float32)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_field_type(field.name, getattr(self, field.name))
        at_least = {"horizon": 1, "n_simulations": 1, "max_context": 2, "batch_size": 1, "seed": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"rlhs {name} must be >= {low}, got {getattr(self, name)}")
        if not self.simulator.strip():
            raise ValueError("rlhs simulator is empty: name a causal-LM directory, hub id or smollm2-135m")
        if not self.judge.strip():
            raise ValueError(f"rlhs judge is empty: {JUDGE_YES_NO} or a reward spec")
        if self.judge.strip().startswith("rlhs:"):
            raise ValueError(f"rlhs judge {self.judge!r}: a hindsight reward cannot judge another one")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"rlhs temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rlhs top_p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0 and self.n_simulations > 1:
            raise ValueError(f"rlhs n_simulations={self.n_simulations} with temperature 0 repeats one greedy "
                             "simulation: sample (temperature > 0) or simulate once")
        if self.horizon >= self.max_context:
            raise ValueError(f"rlhs horizon ({self.horizon}) must be below max_context ({self.max_context})")
        if self.facts_column is not None and self.template == DEFAULT_TEMPLATE:
            object.__setattr__(self, "template", FACTS_TEMPLATE)  # frozen: set once, here
        fields = template_fields(self.template)
        if "facts" in fields and self.facts_column is None:
            raise ValueError("rlhs template uses {facts}: name the dataset column that holds them, facts_column")
        if self.facts_column is not None and "facts" not in fields:
            raise ValueError(f"rlhs facts_column {self.facts_column!r} is set but the template has no {{facts}} field")

    @property
    def yes_no(self) -> bool:
        """Whether the judge is the simulator's P(yes)."""
        return self.judge.strip() == JUDGE_YES_NO


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "str | None": (str, type(None)),
}


def check_field_type(name: str, value: Any) -> None:
    """ValueError when `value` does not have field `name`'s type (an int is not a bool here)."""
    wanted = {f.name: str(f.type) for f in dataclasses.fields(HindsightConfig)}[name]
    types = _TYPES[wanted]
    if isinstance(value, bool) and bool not in types:
        raise ValueError(f"rlhs {name} must be {wanted.replace(' | None', ' or null')}, got {value!r}")
    if not isinstance(value, types):
        raise ValueError(f"rlhs {name} must be {wanted.replace(' | None', ' or null')}, got {value!r}")


def template_fields(template: str) -> set[str]:
    """The `{field}` names of a template; an unknown field or a bad brace is a ValueError."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"rlhs template {template[:60]!r}: {err} (write a literal brace as {{{{ or }}}})") from err
    unknown = sorted(names - set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(f"rlhs template has unknown field {{{unknown[0]}}}; fields: "
                         + ", ".join("{" + name + "}" for name in TEMPLATE_FIELDS))
    return names


def config_from_mapping(values: dict[str, Any]) -> HindsightConfig:
    """A `HindsightConfig` from a mapping of its field names (unknown keys are errors)."""
    known = [field.name for field in dataclasses.fields(HindsightConfig)]
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; keys: {', '.join(known)}")
    if "simulator" not in values:
        raise ValueError("'simulator' is required: a causal-LM directory, hub id or smollm2-135m")
    return HindsightConfig(**values)


def load_config(path: str | Path) -> HindsightConfig:
    """The `HindsightConfig` in a YAML file; every error is one line naming the file."""
    import yaml

    where = f"rlhs config {str(path)!r}"
    file = Path(path).expanduser()
    if not str(path).strip():
        raise ValueError("rlhs: write the config file after the colon, rlhs:CONFIG.yaml")
    if not file.is_file():
        raise ValueError(f"{where} does not exist")
    try:
        values = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of settings (simulator: DIR, judge: ...), "
                         f"got {type(values).__name__}")
    try:
        return config_from_mapping(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


__all__ = ["DEFAULT_TEMPLATE", "FACTS_TEMPLATE", "JUDGE_YES_NO", "OUTCOME_PREFIX", "QUESTION_SUFFIX",
           "HindsightConfig", "config_from_mapping", "load_config", "template_fields"]
