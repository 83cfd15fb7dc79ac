"""The task file of `alignkit imagine` and the prompts built from it.

task.yaml keys (only `task` is required; any other key is an error naming the file and key):

    task: "You are a support agent ... ask for the order number before answering."
                              # the agent's goal; also the agent's system prompt, verbatim
    agent_role: support agent # names used in prompts and transcripts (default assistant/user)
    user_role: customer
    scenario: "You need help with an order you placed last week."
                              # the user's situation, given to the user simulator (optional)
    personas:                 # optional: strings (cooperative) or {description, suboptimal}
      - "A retired teacher who orders books online."
      - {description: "A busy nurse on a break.", suboptimal: true}
    n_personas: 8             # without `personas`: how many the model writes first
    suboptimal_fraction: 0.5  # without `personas`: the share given a suboptimal behaviour
    reward: {judge: true, question: "Did the support agent ask for the order number?"}
                              # or a reward spec string ("regex:order number", "file.py:fn"),
                              # or {spec: "length", target: 50} (extra keys go to the reward)

Without `reward` the model judges with the question "Did the {agent_role} achieve its goal?".

Persona writing follows the paper's "reasoning" step (Hong et al. 2023): each persona is asked
for with a behaviour drawn in order from `SUBOPTIMAL_BEHAVIOURS` (the first
round(suboptimal_fraction * n_personas) personas) or `COOPERATIVE_BEHAVIOURS` (the rest), and
the behaviour is kept in the persona text so the user simulator sees it even when the written
description forgets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUBOPTIMAL_BEHAVIOURS = (
    "vague: they describe what they need only loosely and leave out details",
    "unsure what they want, and they change their mind during the conversation",
    "impatient and uncooperative: they dodge questions and answer in a few words",
    "contradictory: they give details that conflict with what they said before",
    "chatty and off-topic: they keep drifting away from their request",
)
COOPERATIVE_BEHAVIOURS = (
    "clear and cooperative: they answer questions and give details when asked",
    "polite and precise about what they need",
    "friendly and patient",
)
TASK_KEYS = ("task", "agent_role", "user_role", "scenario", "personas", "n_personas",
             "suboptimal_fraction", "reward")


@dataclass
class Persona:
    """A simulated user: the text the user simulator plays, and whether it was written to
    behave suboptimally (vague, contradictory, uncooperative, ...)."""

    text: str
    suboptimal: bool


@dataclass
class RewardChoice:
    """How dialogues are labelled: the model's own yes/no judgement (`judge`, with `question`)
    or a reward spec for `alignkit.rewards.load_reward` (with `kwargs`)."""

    judge: bool
    question: str = ""
    spec: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"judge: {self.question}" if self.judge else self.spec


@dataclass
class ImagineTask:
    """A parsed task file (see the module docstring)."""

    task: str
    agent_role: str = "assistant"
    user_role: str = "user"
    scenario: str = ""
    personas: list[Persona] | None = None
    n_personas: int = 8
    suboptimal_fraction: float = 0.5
    reward: RewardChoice | None = None
    source: str = "<task>"


def _text(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source}: key '{key}' must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _personas(source: str, value: Any) -> list[Persona]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: key 'personas' must be a non-empty list of strings or "
                         "{description, suboptimal} mappings")
    personas = []
    for k, item in enumerate(value, start=1):
        where = f"personas[{k}]"
        if isinstance(item, str):
            personas.append(Persona(_text(source, where, item), False))
            continue
        if not isinstance(item, dict):
            raise ValueError(f"{source}: key '{where}' must be a string or a mapping, got {type(item).__name__}")
        unknown = sorted(set(item) - {"description", "suboptimal"})
        if unknown:
            raise ValueError(f"{source}: key '{where}.{unknown[0]}' is unknown; a persona has "
                             "description and suboptimal")
        suboptimal = item.get("suboptimal", False)
        if not isinstance(suboptimal, bool):
            raise ValueError(f"{source}: key '{where}.suboptimal' must be true or false, got {suboptimal!r}")
        personas.append(Persona(_text(source, f"{where}.description", item.get("description")), suboptimal))
    return personas


def _reward(source: str, value: Any, agent_role: str) -> RewardChoice:
    default_question = f"Did the {agent_role} achieve its goal?"
    if value is None:
        return RewardChoice(judge=True, question=default_question)
    if isinstance(value, str):
        return RewardChoice(judge=False, spec=_text(source, "reward", value))
    if not isinstance(value, dict):
        raise ValueError(f"{source}: key 'reward' must be a reward spec string or a mapping "
                         f"({{judge: true, question: ...}} or {{spec: ..., ...}}), got {type(value).__name__}")
    if value.get("judge", False):
        if value["judge"] is not True:
            raise ValueError(f"{source}: key 'reward.judge' must be true or false, got {value['judge']!r}")
        unknown = sorted(set(value) - {"judge", "question"})
        if unknown:
            raise ValueError(f"{source}: key 'reward.{unknown[0]}' is unknown with judge: true "
                             "(it takes question)")
        question = value.get("question", default_question)
        return RewardChoice(judge=True, question=_text(source, "reward.question", question))
    if "spec" not in value:
        raise ValueError(f"{source}: key 'reward.spec' is missing (or set reward.judge: true)")
    kwargs = {k: v for k, v in value.items() if k not in ("spec", "judge")}
    return RewardChoice(judge=False, spec=_text(source, "reward.spec", value["spec"]), kwargs=kwargs)


def parse_task(data: Any, source: str) -> ImagineTask:
    """An `ImagineTask` from the mapping a task file holds; every problem is a one-line
    ValueError naming `source` and the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of keys ({', '.join(TASK_KEYS)}), got "
                         f"{type(data).__name__}")
    unknown = sorted(set(data) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"{source}: key '{unknown[0]}' is unknown; known keys: {', '.join(TASK_KEYS)}")
    if "task" not in data:
        raise ValueError(f"{source}: key 'task' is missing (the agent's goal, in words)")
    agent_role = _text(source, "agent_role", data.get("agent_role", "assistant"))
    user_role = _text(source, "user_role", data.get("user_role", "user"))
    scenario = data.get("scenario", "")
    if scenario:
        scenario = _text(source, "scenario", scenario)
    n_personas = data.get("n_personas", 8)
    if isinstance(n_personas, bool) or not isinstance(n_personas, int) or n_personas < 1:
        raise ValueError(f"{source}: key 'n_personas' must be an integer >= 1, got {n_personas!r}")
    fraction = data.get("suboptimal_fraction", 0.5)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{source}: key 'suboptimal_fraction' must be a number in [0, 1], got {fraction!r}")
    if "personas" in data and ("n_personas" in data or "suboptimal_fraction" in data):
        extra = "n_personas" if "n_personas" in data else "suboptimal_fraction"
        raise ValueError(f"{source}: key '{extra}' is for personas the model writes; this file lists "
                         "its personas (mark suboptimal ones with suboptimal: true)")
    return ImagineTask(
        task=_text(source, "task", data["task"]),
        agent_role=agent_role,
        user_role=user_role,
        scenario=scenario,
        personas=_personas(source, data["personas"]) if "personas" in data else None,
        n_personas=n_personas,
        suboptimal_fraction=float(fraction),
        reward=_reward(source, data.get("reward"), agent_role),
        source=source,
    )


def load_task(path: str | Path) -> ImagineTask:
    """Read and check a task file (YAML or JSON)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--task {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    return parse_task(data, str(path))


# --------------------------------------------------------------------------- prompts


def persona_behaviours(n: int, suboptimal_fraction: float) -> list[tuple[str, bool]]:
    """(behaviour, suboptimal) for persona 0..n-1: the first round(fraction * n) suboptimal,
    behaviours taken in order (cycling) from each list."""
    n_bad = round(suboptimal_fraction * n)
    return [(SUBOPTIMAL_BEHAVIOURS[i % len(SUBOPTIMAL_BEHAVIOURS)], True) if i < n_bad
            else (COOPERATIVE_BEHAVIOURS[(i - n_bad) % len(COOPERATIVE_BEHAVIOURS)], False)
            for i in range(n)]


def persona_request(task: ImagineTask, behaviour: str) -> list[dict[str, str]]:
    """The conversation asking the model to describe one user with `behaviour`, in the task's
    `scenario` (else the agent's instructions, which small models tend to turn into the persona)."""
    situation = task.scenario or f"The {task.agent_role}'s instructions: {task.task}"
    return [
        {"role": "system", "content": "You write short, realistic character descriptions for role-play."},
        {"role": "user", "content": (
            f"A {task.user_role} is about to talk to a {task.agent_role}. {situation}\n\n"
            f"Describe the {task.user_role} (not the {task.agent_role}) in one or two sentences: who "
            f"they are and what they want. They are {behaviour}.")},
    ]


def persona_text(description: str, behaviour: str) -> str:
    """What the user simulator plays: the written description plus the behaviour asked for."""
    return f"{description.strip()} Behaviour: {behaviour}."


def user_system_prompt(task: ImagineTask, persona: Persona) -> str:
    scenario = f" {task.scenario}" if task.scenario else ""
    return (f"You are role-playing a {task.user_role} talking to a {task.agent_role}. "
            f"Your character: {persona.text}{scenario} Stay in character. Write only the "
            f"{task.user_role}'s next message, one to three sentences, without a name or label.")


def user_opening(task: ImagineTask) -> str:
    """The cue the user simulator answers before the conversation has any message."""
    return f"(You start the conversation. Write your first message to the {task.agent_role}.)"


def judge_request(task: ImagineTask, transcript: str, question: str) -> list[dict[str, str]]:
    """The conversation whose next token the judge reads as yes / no."""
    return [
        {"role": "system", "content": "You judge whether a conversation reached its goal. Answer yes or no."},
        {"role": "user", "content": (
            f"Conversation between a {task.user_role} and a {task.agent_role}:\n\n{transcript}\n\n"
            f"The {task.agent_role}'s goal: {task.task}\nQuestion: {question}\nAnswer yes or no.")},
    ]
