"""Gymnasium environments with discrete or text actions as alignkit environments:
`--env gymnasium:ENV_ID[,k=v...]` (gymnasium >= 1.0; `pip install alignkit[envs]`).

Each policy turn is one `env.step`. The user message shows the observation as text:

- the environment's `ansi` rendering when it has one (toy-text grids such as FrozenLake,
  CliffWalking, Taxi), with its ANSI colour marks turned into brackets: FrozenLake's agent on
  the start tile `\\x1b[41mS\\x1b[0m` reads `[S]`;
- a sentence for the toy-text environments whose grid alone is ambiguous or absent (Taxi: where
  the taxi, passenger and destination are; Blackjack, which has no `ansi` mode: the hand);
- else `str(observation)` (a `spaces.Text` observation as it is; arrays as lists).

The policy's reply is the action. `Discrete(n)`: the last action name in the reply, matched as a
whole word, case-insensitively (FrozenLake `Left, Down, Right, Up`, CliffWalking `Up, Right, Down,
Left`, Taxi `South, North, East, West, Pickup, Dropoff`, Blackjack `Stick, Hit`, in the
environments' own index order, or the user's `actions=a|b|c`); without any name, the last
integer in `0..n-1`. `Text`: the whole reply, stripped. A reply that names no valid action is
answered with the list of valid ones, scores `invalid_reward` (default 0) and counts as
`env/invalid_action`; the episode goes on (the loop's `max_turns` bounds it). Other action
spaces (Box, MultiDiscrete, ...) are refused when the spec is loaded.

Rewards are gymnasium's, turn by turn; the episode ends when the environment terminates or its
TimeLimit truncates it (FrozenLake-v1: 100 steps, Taxi-v4: 200); `env/terminated` and
`env/truncated` say which.

Options: `seed=S` (base of the seed counter), `actions=a|b|...`, `observation=auto|obs` (`obs`:
always `str(observation)`), `invalid_reward=R`; every other key goes to `gymnasium.make`
(`gymnasium:FrozenLake-v1,is_slippery=false,map_name=8x8`). The first messages are the row's
`prompt` (when it has one) with the instructions and first observation appended to its last
user message, else one user message with both. `reset(row)` seeds the environment with
`row["seed"]` when the row has one, else the next value of a counter shared by the factory's
instances (gymnasium environments own their RNG, so parallel slots need no lock).
"""

from __future__ import annotations

import difflib
import itertools
import re
import threading
from collections.abc import Callable
from typing import Any

from alignkit.agents.adapters import missing_package_error, parse_options
from alignkit.agents.protocol import Message, prompt_messages

OWN_OPTIONS = ("seed", "actions", "observation", "invalid_reward")
KNOWN_ACTIONS: dict[str, tuple[str, ...]] = {  # gymnasium's index order (toy_text docstrings)
    "FrozenLake": ("Left", "Down", "Right", "Up"),
    "CliffWalking": ("Up", "Right", "Down", "Left"),
    "Taxi": ("South", "North", "East", "West", "Pickup", "Dropoff"),
    "Blackjack": ("Stick", "Hit"),
}
SGR_SPAN = re.compile(r"\x1b\[[0-9;]*m(.*?)\x1b\[0m", re.DOTALL)
ANY_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
INTEGER = re.compile(r"(?<![\w.-])\d+(?![\w.])")
TAXI_LOCATIONS = ("R", "G", "Y", "B")


def ansi_to_text(frame: str) -> str:
    """An `ansi` frame as plain text: each coloured span `ESC[..m X ESC[0m` becomes `[X]`, any
    other escape sequence is dropped, and blank edge lines are trimmed."""
    return ANY_ESCAPE.sub("", SGR_SPAN.sub(lambda m: f"[{m.group(1)}]", frame)).strip("\n")


def parse_action(reply: str, names: tuple[str, ...], n: int) -> int | None:
    """The action index a reply names (module docstring): the last whole-word, case-insensitive
    match of one of `names`, else the last integer in 0..n-1, else None."""
    if names:
        pattern = r"\b(" + "|".join(re.escape(name) for name in names) + r")\b"
        found = re.findall(pattern, reply, flags=re.IGNORECASE)
        if found:
            lowered = [name.lower() for name in names]
            return lowered.index(found[-1].lower())
    numbers = [int(text) for text in INTEGER.findall(reply) if int(text) < n]
    return numbers[-1] if numbers else None


def describe_taxi(env: Any, observation: Any) -> str:
    """Taxi-v4's decoded state: taxi (row, col), passenger at R/G/Y/B or in the taxi, the
    destination letter (the grid's colours alone do not tell passenger from destination)."""
    row, col, passenger, destination = env.unwrapped.decode(int(observation))
    where = "in the taxi" if passenger == 4 else f"waiting at {TAXI_LOCATIONS[passenger]}"
    return (f"The taxi is at row {row}, column {col}; the passenger is {where}; "
            f"the destination is {TAXI_LOCATIONS[destination]}.")


def describe_blackjack(env: Any, observation: Any) -> str:
    """Blackjack-v1's (player sum, dealer card, usable ace) as a sentence."""
    total, dealer, usable_ace = (int(v) for v in observation)
    return (f"Your hand totals {total}{' with a usable ace' if usable_ace else ''}; "
            f"the dealer shows {dealer}.")


DESCRIBERS: dict[str, Callable[[Any, Any], str]] = {"Taxi": describe_taxi, "Blackjack": describe_blackjack}


def plain_observation(observation: Any) -> str:
    """`str(observation)`, with numpy arrays as Python lists."""
    tolist = getattr(observation, "tolist", None)
    return str(tolist() if callable(tolist) else observation)


def gymnasium_factory(text: str, spec: str) -> Callable[[], GymnasiumEnvironment]:
    """Check the id, options and spaces once (one environment is made for it); the factory then
    makes one `GymnasiumEnvironment` per conversation slot."""
    try:
        import gymnasium
    except ImportError as err:
        raise missing_package_error(spec, "gymnasium", err) from None
    env_id, options = parse_options(text, spec)
    if env_id not in gymnasium.registry:
        close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"--env {spec}: gymnasium has no environment {env_id!r}{hint}")
    make_kwargs = {k: v for k, v in options.items() if k not in OWN_OPTIONS}
    probe = make_env(gymnasium, env_id, make_kwargs, None, spec)
    action_space = probe.action_space
    family = probe.spec.name if probe.spec is not None else env_id
    render = (options.get("observation", "auto") == "auto"
              and "ansi" in (probe.metadata.get("render_modes") or []))
    probe.close()
    if options.get("observation", "auto") not in ("auto", "obs"):
        raise ValueError(f"--env {spec}: observation must be auto or obs, got {options['observation']!r}")
    if isinstance(action_space, gymnasium.spaces.Discrete):
        names = action_names(options.get("actions"), family, int(action_space.n), spec)
        actions = ActionSpace(int(action_space.n), names, int(action_space.start))
    elif isinstance(action_space, gymnasium.spaces.Text):
        actions = ActionSpace(0, (), 0, text=True)
    else:
        raise ValueError(f"--env {spec}: {env_id} has a {type(action_space).__name__} action space; "
                         "the gymnasium adapter plays Discrete and Text actions only")
    try:
        invalid_reward = float(options.get("invalid_reward", 0.0))
    except (TypeError, ValueError):
        raise ValueError(f"--env {spec}: invalid_reward must be a number") from None
    seeds = itertools.count(int(options.get("seed", 0)))
    seeds_lock = threading.Lock()

    def next_seed() -> int:
        with seeds_lock:
            return next(seeds)

    def make() -> GymnasiumEnvironment:
        env = make_env(gymnasium, env_id, make_kwargs, "ansi" if render else None, spec)
        return GymnasiumEnvironment(env, env_id, actions, DESCRIBERS.get(family), render,
                                    invalid_reward, next_seed, spec)

    return make


def make_env(gymnasium: Any, env_id: str, kwargs: dict[str, Any], render_mode: str | None, spec: str) -> Any:
    """`gymnasium.make`, with its errors (bad keyword, deprecated version) as one line."""
    try:
        return gymnasium.make(env_id, render_mode=render_mode, **kwargs)
    except (TypeError, gymnasium.error.Error) as err:
        raise ValueError(f"--env {spec}: gymnasium.make({env_id!r}) failed: {err}") from None


def action_names(given: Any, family: str, n: int, spec: str) -> tuple[str, ...]:
    """The names of a Discrete(n) space's actions: `actions=a|b|c` when given (exactly n, all
    different), else the known table, else none (integers only)."""
    if given is None:
        names = KNOWN_ACTIONS.get(family, ())
        return names if len(names) == n else ()
    names = tuple(part.strip() for part in str(given).split("|"))
    if len(names) != n or not all(names) or len({name.lower() for name in names}) != n:
        raise ValueError(f"--env {spec}: actions= needs {n} different names separated by |, got {given!r}")
    return names


class ActionSpace:
    """What the adapter accepts as an action: Discrete(n) (indices from `start`) with optional
    names, or free text."""

    def __init__(self, n: int, names: tuple[str, ...], start: int, text: bool = False):
        self.n, self.names, self.start, self.text = n, names, start, text

    def listing(self) -> str:
        if self.text:
            return "any text"
        if self.names:
            return ", ".join(self.names)
        return f"an integer from 0 to {self.n - 1}"

    def parse(self, reply: str) -> Any:
        """The gymnasium action for `reply`, or None when it names none."""
        if self.text:
            return reply.strip() or None
        index = parse_action(reply, self.names, self.n)
        return None if index is None else self.start + index


class GymnasiumEnvironment:
    """One gymnasium environment, reset for each episode (see the module docstring)."""

    def __init__(self, env: Any, env_id: str, actions: ActionSpace, describe: Callable | None,
                 render: bool, invalid_reward: float, next_seed: Callable[[], int], spec: str):
        self.env, self.env_id, self.actions = env, env_id, actions
        self.describe, self.render, self.invalid_reward = describe, render, invalid_reward
        self.next_seed, self.spec = next_seed, spec
        self.done, self.steps = True, 0

    def instructions(self) -> str:
        if self.actions.text:
            return f"You are acting in the {self.env_id} environment; your whole reply is your action."
        return f"You are playing {self.env_id}. Each turn, reply with one action: {self.actions.listing()}."

    def observation_text(self, observation: Any) -> str:
        parts = []
        if self.render:
            frame = self.env.render()
            if isinstance(frame, str) and frame.strip():
                parts.append(ansi_to_text(frame))
        if self.describe is not None:
            parts.append(self.describe(self.env, observation))
        return "\n".join(parts) if parts else plain_observation(observation)

    def reset(self, row: dict[str, Any]) -> list[Message]:
        seed = row.get("seed")
        seed = self.next_seed() if seed is None else int(seed)
        observation, _ = self.env.reset(seed=seed)
        self.done, self.steps = False, 0
        opening = f"{self.instructions()}\n\n{self.observation_text(observation)}"
        if row.get("prompt") is None:
            return [{"role": "user", "content": opening}]
        messages = prompt_messages(row, f"--env {self.spec}")
        last = messages[-1]
        if last.get("role") != "user":
            return [*messages, {"role": "user", "content": opening}]
        messages[-1] = {**last, "content": f"{last.get('content', '')}\n\n{opening}"}
        return messages

    def step(self, messages: list[Message]) -> tuple[Any, float, bool, dict[str, Any]]:
        if self.done:
            raise ValueError(f"--env {self.spec}: step after the episode ended; call reset first")
        last = messages[-1] if messages else {}
        if last.get("role") != "assistant":
            raise ValueError(f"--env {self.spec}: step needs the conversation to end with the "
                             "policy's assistant turn")
        action = self.actions.parse(str(last.get("content") or ""))
        if action is None:
            reply = {"role": "user", "content": f"That is not a valid action. Reply with one of: "
                                                f"{self.actions.listing()}."}
            return reply, self.invalid_reward, False, {"invalid_action": 1.0}
        observation, reward, terminated, truncated, _ = self.env.step(action)
        self.steps += 1
        self.done = bool(terminated or truncated)
        info = {"invalid_action": 0.0, "terminated": float(bool(terminated)),
                "truncated": float(bool(truncated)), "env_steps": float(self.steps)}
        reply = None if self.done else {"role": "user", "content": self.observation_text(observation)}
        return reply, float(reward), self.done, info
