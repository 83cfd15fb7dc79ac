"""`--env gymnasium:ENV_ID`: toy-text environments played through the adapter with scripted
replies, so every reward, observation and end of episode follows from the environment's rules."""

from __future__ import annotations

import re
import sys

import pytest

from alignkit.agents.adapter_gymnasium import ansi_to_text, parse_action
from alignkit.agents.adapters import adapter_factory
from alignkit.agents.protocol import as_step_result

pytestmark = pytest.mark.envs
gymnasium = pytest.importorskip("gymnasium")

FROZEN = "gymnasium:FrozenLake-v1,is_slippery=false"


def assistant(text):
    return {"role": "assistant", "content": text}


def play(env, replies, row=None):
    """Reset with `row` and send `replies` one by one; the checked step results."""
    messages = env.reset(row or {"seed": 0})
    results = []
    for text in replies:
        messages.append(assistant(text))
        result = as_step_result(env.step(messages), "test")
        results.append(result)
        if result.done:
            break
        messages.extend(result.reply)
    return messages, results


def test_parse_action_names_then_integers():
    names = ("Left", "Down", "Right", "Up")
    assert parse_action("I go right", names, 4) == 2
    assert parse_action("not Left... UP!", names, 4) == 3  # the last name wins
    assert parse_action("Upward", names, 4) is None  # whole words only
    assert parse_action("action 1", names, 4) == 1  # no name: the last integer in range
    assert parse_action("7 or 9", names, 4) is None and parse_action("2.5", names, 4) is None
    assert parse_action("[0]", (), 2) == 0


def test_ansi_marks_become_brackets():
    assert ansi_to_text("\n\x1b[41mS\x1b[0mFFF\nFHFH\n") == "[S]FFF\nFHFH"
    assert ansi_to_text("|\x1b[43m \x1b[0m|\x1b[34;1mB\x1b[0m: |\x1b[2K") == "|[ ]|[B]: |"


def test_frozen_lake_path_to_the_goal():
    """4x4 map SFFF/FHFH/FFFH/HFFG, no slipping: Right, Right, Down, Down, Down, Right walks
    (0,0) -> (0,2) -> (3,2) -> (3,3) = G on frozen tiles only; only reaching G pays 1."""
    messages, results = play(adapter_factory(FROZEN)(), ["Right", "right", "Down", "down", "DOWN", "Right"])
    assert "Left, Down, Right, Up" in messages[0]["content"]
    assert messages[0]["content"].endswith("[S]FFF\nFHFH\nFFFH\nHFFG")
    assert messages[2]["content"] == "  (Right)\nS[F]FF\nFHFH\nFFFH\nHFFG"
    assert [r.reward for r in results] == [0.0] * 5 + [1.0]
    assert [r.done for r in results] == [False] * 5 + [True]
    assert results[-1].info == {"invalid_action": 0.0, "terminated": 1.0, "truncated": 0.0, "env_steps": 6.0}


def test_hole_ends_the_episode_with_no_reward():
    _, results = play(adapter_factory(FROZEN)(), ["Down", "Right"])  # (1,0) then the hole (1,1)
    assert [r.done for r in results] == [False, True] and results[-1].reward == 0.0


def test_invalid_action_is_answered_and_counted():
    env = adapter_factory(FROZEN + ",invalid_reward=-0.5")()
    messages, results = play(env, ["jump!", "Right"])
    assert results[0].reward == -0.5 and not results[0].done and results[0].info == {"invalid_action": 1.0}
    assert results[0].reply[0]["content"] == "That is not a valid action. Reply with one of: Left, Down, Right, Up."
    assert results[1].info["env_steps"] == 1.0  # the invalid reply took no env step


def test_time_limit_truncates():
    """max_episode_steps=2 goes to gymnasium.make: two moves into the wall end the episode."""
    _, results = play(adapter_factory(FROZEN + ",max_episode_steps=2")(), ["Left", "Up"])
    assert results[-1].done and results[-1].info["truncated"] == 1.0 and results[-1].info["terminated"] == 0.0


def test_prompt_row_and_user_action_names():
    env = adapter_factory(FROZEN + ",actions=w|s|e|n")()
    opening = env.reset({"prompt": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Reach the goal."}], "seed": 0})
    assert [m["role"] for m in opening] == ["system", "user"]
    assert opening[1]["content"].startswith("Reach the goal.\n\nYou are playing FrozenLake-v1. "
                                            "Each turn, reply with one action: w, s, e, n.")
    reply, _, _, _ = env.step([*opening, assistant("e")])
    assert "S[F]FF" in reply["content"]


def test_taxi_describes_the_state_and_seeds_follow_rows_or_the_counter():
    factory = adapter_factory("gymnasium:Taxi-v4,seed=3")
    first, second, explicit = factory(), factory(), factory()
    drawn = [first.reset({})[0]["content"], second.reset({})[0]["content"]]
    assert drawn == [explicit.reset({"seed": 3})[0]["content"], explicit.reset({"seed": 4})[0]["content"]]
    assert drawn[0] != drawn[1]
    assert re.search(r"The taxi is at row \d, column \d; the passenger is waiting at [RGYB]; "
                     r"the destination is [RGYB]\.$", drawn[0])
    _, results = play(factory(), ["Pickup"], {"seed": 3})  # no passenger under the taxi: -10
    assert results[0].reward == -10.0 and not results[0].done


def test_blackjack_has_no_ansi_mode_and_is_described():
    env = adapter_factory("gymnasium:Blackjack-v1")()
    opening = env.reset({"seed": 0})
    assert re.search(r"Your hand totals \d+( with a usable ace)?; the dealer shows \d+\.$", opening[0]["content"])
    _, results = play(env, ["Stick"], {"seed": 0})
    assert results[0].done and results[0].reward in (-1.0, 0.0, 1.0, 1.5)


class EchoEnv(gymnasium.Env):
    """Text observations and actions: reward 1 for replying the word it shows."""

    def __init__(self, render_mode=None):
        self.observation_space = gymnasium.spaces.Text(16, charset="abcdefghijklmnopqrstuvwxyz ")
        self.action_space = gymnasium.spaces.Text(64, charset="abcdefghijklmnopqrstuvwxyz ")
        self.word = ""

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.word = ["apple", "pear"][int(self.np_random.integers(2))]
        return f"say {self.word}", {}

    def step(self, action):
        return "", float(action == self.word), True, False, {}


def test_text_action_space_takes_the_whole_reply():
    gymnasium.register(id="AlignkitEcho-v0", entry_point=EchoEnv)
    env = adapter_factory("gymnasium:AlignkitEcho-v0")()
    opening = env.reset({"seed": 1})
    word = opening[0]["content"].split()[-1]
    assert opening[0]["content"].startswith("You are acting in the AlignkitEcho-v0 environment")
    _, results = play(env, [f"  {word}\n"], {"seed": 1})
    assert results[0].done and results[0].reward == 1.0


@pytest.mark.parametrize("spec, message", [
    ("gymnasium:FrozenLak-v1", "no environment 'FrozenLak-v1'; did you mean FrozenLake-v1"),
    ("gymnasium:Taxi-v3", "no environment 'Taxi-v3'; did you mean Taxi-v4"),
    ("gymnasium:FrozenLake-v1,colour=red", "gymnasium.make('FrozenLake-v1') failed"),
    ("gymnasium:FrozenLake-v1,actions=a|b", "actions= needs 4 different names"),
    ("gymnasium:FrozenLake-v1,observation=pixels", "observation must be auto or obs"),
    ("gymnasium:MountainCarContinuous-v0", "Box action space; the gymnasium adapter plays Discrete and Text"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        adapter_factory(spec)
    assert "\n" not in str(err.value) and spec.split(",")[0] in str(err.value)


def test_missing_gymnasium_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(ValueError, match=re.escape("needs the gymnasium package")):
        adapter_factory(FROZEN)
