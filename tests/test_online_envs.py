"""Adapter environments in training, end to end on the tiny model: GRPO for 2 steps against a
TextArena game (TicTacToe, random opponent) and against a verifiers 0.4 taskset with an Env of
its own written in this file. The rewards are the environments' (no --reward): each row of
metrics has the episode keys and env/* info, and the numbers follow from the game's rules."""

from __future__ import annotations

import sys
import textwrap

import pytest
from run_helpers import read_metrics

import alignkit

pytestmark = pytest.mark.envs

SETTINGS = dict(batch_size=2, group_size=2, max_steps=2, lr=1e-3, warmup_ratio=0.0, scheduler="constant",
                progress=False, max_new_tokens=8, max_turns=2, max_episode_tokens=768, padding_free=False,
                allow_degenerate=True)  # the tiny model cannot play: equal rewards in a group are expected
EPISODE_KEYS = ("turns/mean", "episode/return", "episode/length", "episode/finish_done", "reward/mean", "loss")


def test_grpo_plays_tictactoe_against_a_random_opponent(tiny_model_dir, tmp_path):
    """Two policy turns cannot win TicTacToe (player 0 needs three marks), so a game ends within
    them only by two invalid moves (the first gets a warning, the second loses): every finished
    episode returns textarena's -1 and reports invalid_move, an unfinished one 0."""
    pytest.importorskip("textarena")
    rows = [{"prompt": "Play TicTacToe.", "seed": seed} for seed in range(4)]
    alignkit.train("grpo", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "run",
                   env="textarena:TicTacToe-v0,opponent=random", **SETTINGS)
    metrics = read_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics] == [1, 2]
    for row in metrics:
        assert all(key in row for key in EPISODE_KEYS), sorted(row)
        assert row["episode/finish_done"] > 0  # the random tiny model's moves are invalid
        assert row["episode/return"] == pytest.approx(-row["episode/finish_done"])
        assert row["reward/mean"] == pytest.approx(row["episode/return"])  # the game's reward only
        assert row["env/invalid_move"] == 1.0 and row["env/game_turns"] >= 1.0
        assert row["turns/mean"] == 2.0  # the first invalid move is answered, the second ends it
        assert row["episode/length"] > row["episode/policy_tokens"]  # the game's observations are there


TWICE_ENV = '''
import verifiers.v1 as vf

class TwiceTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    @vf.reward(weight=0.5)
    async def replied(self, trace: vf.Trace) -> float:
        return 1.0 if trace.last_reply is not None else 0.0

    @vf.metric
    async def turns(self, trace: vf.Trace) -> float:
        return float(trace.num_turns)

class TwiceTaskset(vf.Taskset[TwiceTask, vf.TasksetConfig]):
    def load(self):
        for prompt in ("Say hello.", "Name a fruit."):
            yield TwiceTask(vf.TaskData(prompt=prompt), self.config.task)

class TwiceEnvConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig()

class TwiceEnv(vf.Env[TwiceEnvConfig]):
    """The env asks once more ("Again."), then the episode ends and the task scores it."""
    async def run(self, task, agents):
        async with agents.player.interaction(task) as interaction:
            segment = await interaction.turn()
            if not segment.terminated:
                await interaction.turn("Again.")

__all__ = ["TwiceTaskset", "TwiceEnv"]
'''


@pytest.fixture()
def twice_taskset(tmp_path):
    """`alignkit_vf_twice` on sys.path (verifiers imports a taskset id as a module)."""
    pytest.importorskip("verifiers.v1")
    root = tmp_path / "tasksets"
    root.mkdir()
    (root / "alignkit_vf_twice.py").write_text(textwrap.dedent(TWICE_ENV))
    sys.path.insert(0, str(root))
    yield "verifiers:alignkit_vf_twice"
    sys.path.remove(str(root))
    sys.modules.pop("alignkit_vf_twice", None)


def test_grpo_on_a_verifiers_env_of_two_turns(tiny_model_dir, tmp_path, twice_taskset):
    """Every episode is the env's two turns, then the task's reward: 0.5 x (a reply was made) =
    0.5, with the trace's metric `turns` = 2 and the weighted component in env/*."""
    rows = [{"prompt": "unused", "example_id": i % 2} for i in range(4)]
    alignkit.train("grpo", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "run", env=twice_taskset,
                   **SETTINGS)
    metrics = read_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics] == [1, 2]
    for row in metrics:
        assert all(key in row for key in EPISODE_KEYS), sorted(row)
        assert row["turns/mean"] == 2.0 and row["episode/finish_done"] == 1.0
        assert row["episode/return"] == 0.5 and row["reward/mean"] == 0.5  # the task's reward only
        assert row["env/turns"] == 2.0 and row["env/reward_replied"] == 0.5


def test_grpo_walks_frozen_lake(tiny_model_dir, tmp_path):
    """FrozenLake's goal is 6 moves away, so in 2 turns the environment pays nothing and the
    return is invalid_reward=-1 per reply that names no action: episode/return equals
    -(invalid share of turns) x (turns per episode), and every turn took one env step or was
    answered as invalid."""
    pytest.importorskip("gymnasium")
    rows = [{"prompt": "Walk to the goal G without falling into a hole H.", "seed": seed} for seed in range(4)]
    alignkit.train("grpo", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "run",
                   env="gymnasium:FrozenLake-v1,is_slippery=false,invalid_reward=-1", **SETTINGS)
    metrics = read_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics] == [1, 2]
    for row in metrics:
        assert all(key in row for key in EPISODE_KEYS), sorted(row)
        assert row["turns/mean"] == 2.0 and row["episode/finish_turns"] + row["episode/finish_done"] == 1.0
        assert row["episode/return"] == pytest.approx(-row["env/invalid_action"] * row["turns/mean"])
        assert row["reward/mean"] == pytest.approx(row["episode/return"])
