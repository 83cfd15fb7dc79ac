"""Adapters for environments users already have (alignkit/agents/adapters.py and friends):
TextArena games, verifiers 0.4 tasksets/envs, TRL environment_factory classes. Each episode is
played end to end by a scripted policy: hand-written assistant turns fed to reset/step."""

from __future__ import annotations

import re
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from alignkit.agents.adapters import adapter_factory, parse_options
from alignkit.agents.protocol import as_step_result, load_env

pytestmark = pytest.mark.envs


def assistant(content: str, **extra) -> dict:
    return {"role": "assistant", "content": content, **extra}


def test_parse_options_types_and_errors():
    assert parse_options("Game-v0, max_turns=5, ratio=0.5, hard=true, name=x", "s") == (
        "Game-v0", {"max_turns": 5, "ratio": 0.5, "hard": True, "name": "x"})
    with pytest.raises(ValueError, match="not key=value"):
        parse_options("Game-v0,oops", "textarena:Game-v0,oops")
    with pytest.raises(ValueError, match="name the game"):
        parse_options("", "textarena:")


def test_other_specs_are_not_adapters():
    assert adapter_factory("my_pkg.envs:Factory") is None
    assert adapter_factory("envs/file.py:Factory") is None


@pytest.mark.parametrize("package, spec", [("textarena", "textarena:TicTacToe-v0"),
                                           ("verifiers", "verifiers:gsm8k")])
def test_missing_package_says_how_to_install(monkeypatch, package, spec):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, f"{package}.v1", None)
    with pytest.raises(ValueError, match=re.escape("pip install alignkit[envs]")) as err:
        adapter_factory(spec)
    assert "\n" not in str(err.value) and spec in str(err.value)


# --- TextArena ---------------------------------------------------------------------------------


def test_listed_moves():
    from alignkit.agents.adapter_textarena import listed_moves

    assert listed_moves("Board\nAvailable Moves: '[0]', '[4]', '[8]'") == ["[0]", "[4]", "[8]"]
    assert listed_moves("Valid moves: '[2, 3]', '[4, 5]'") == ["[2, 3]", "[4, 5]"]
    assert listed_moves("Available Moves: e2e4, d2d4") == ["[e2e4]", "[d2d4]"]
    assert listed_moves("Available Moves: '[1]'\n...\nAvailable Moves: '[5]'") == ["[5]"]
    assert listed_moves("no list here") == []


def test_textarena_guess_the_number_binary_search():
    """GuessTheNumber-v0 (1..20, 10 guesses): halving on the hints finds the number in at most
    5 guesses (2^5 > 20); the game's reward for a correct guess is 1."""
    pytest.importorskip("textarena")
    env = load_env("textarena:GuessTheNumber-v0")()
    opening = env.reset({"seed": 11})
    assert opening[0]["role"] == "user" and "Guess The Number" in opening[0]["content"]
    low, high, guesses = 1, 20, 0
    while True:
        guess = (low + high) // 2
        guesses += 1
        result = as_step_result(env.step([*opening, assistant(f"I guess [{guess}]")]), "test")
        if result.done:
            break
        assert result.reward == 0.0
        hint = result.reply[0]["content"]
        assert hint == f"[GAME] The target number is {'higher' if 'higher' in hint else 'lower'}."
        low, high = (guess + 1, high) if "higher" in hint else (low, guess - 1)
    assert result.reward == 1.0 and guesses <= 5
    assert result.info == {"invalid_move": 0.0, "game_turns": float(guesses)}


def test_textarena_seed_counter_and_row_seed():
    """Rows without `seed` take 0, 1, ... from a counter shared by one factory's instances."""
    pytest.importorskip("textarena")
    factory = adapter_factory("textarena:GuessTheNumber-v0,seed=5")
    first, second, explicit = factory(), factory(), factory()

    def secret(env, row):
        env.reset(row)
        return env.core.state.game_state["game_number"]

    drawn = [secret(first, {}), secret(second, {})]
    assert drawn == [secret(explicit, {"seed": 5}), secret(explicit, {"seed": 6})]


def play_tictactoe(env, seed):
    """Policy: the lowest-numbered available cell each turn. Returns the transcript and the last
    step's (reply, reward, done, info)."""
    messages = env.reset({"seed": seed})
    for _ in range(5):  # player 0 moves at most 5 times on a 3x3 board
        cells = re.findall(r"'\[(\d)\]'", messages[-1]["content"].split("Available Moves:")[-1])
        messages.append(assistant(f"[{min(cells, key=int)}]"))
        out = env.step(messages)
        as_step_result(out, "test")  # within the protocol
        if out[2]:
            return messages, out
        messages.append(out[0])
    raise AssertionError("the game did not end within 5 moves of player 0")


def test_textarena_tictactoe_against_random_opponent():
    pytest.importorskip("textarena")
    factory = adapter_factory("textarena:TicTacToe-v0,opponent=random")
    transcript, (_, reward, _, info) = play_tictactoe(factory(), seed=3)
    assert "[Player 1]" in transcript[2]["content"]  # the opponent's move is reported
    outcome = {"Player 0 has won!": 1.0, "Player 1 has won!": -1.0, "The game is a draw!": 0.0}
    assert reward == outcome[info["reason"]] and info["invalid_move"] == 0.0
    assert play_tictactoe(factory(), seed=3)[0] == transcript  # same seed, same game
    others = [play_tictactoe(factory(), seed=seed)[0] for seed in (4, 5, 6)]
    assert any(other != transcript for other in others)  # the opponent's moves follow the seed


def test_textarena_invalid_moves_lose():
    """TicTacToe allows one invalid move (the game asks again), the second loses: reward -1."""
    pytest.importorskip("textarena")
    env = adapter_factory("textarena:TicTacToe-v0,opponent=random")()
    messages = env.reset({"seed": 0})
    reply, reward, done, _ = env.step([*messages, assistant("I refuse to play")])
    assert not done and reward == 0.0 and "invalid move" in reply["content"]
    _, reward, done, info = env.step([*messages, assistant("still no")])
    assert done and reward == -1.0 and info["invalid_move"] == 1.0


@pytest.mark.parametrize("spec, message", [
    ("textarena:TicTacToo-v0", "no game 'TicTacToo-v0'; did you mean TicTacToe-v0"),
    ("textarena:TicTacToe-v0", "2-player game; the policy is player 0, add opponent=random"),
    ("textarena:GuessTheNumber-v0,opponent=random", "single-player; drop opponent="),
    ("textarena:GuessTheNumber-v0,colour=red", "does not take these options"),
    ("textarena:TicTacToe-v0,players=3,opponent=random", "rejected player count 3"),
])
def test_textarena_bad_specs(spec, message):
    pytest.importorskip("textarena")
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        adapter_factory(spec)
    assert "\n" not in str(err.value)


def test_textarena_opponent_needs_listed_moves():
    pytest.importorskip("textarena")
    env = adapter_factory("textarena:ConnectFour-v0,opponent=random")()
    messages = env.reset({"seed": 0})
    with pytest.raises(ValueError, match="needs the game to list player 1's moves"):
        env.step([*messages, assistant("[3]")])


# --- verifiers (0.4, verifiers.v1) -------------------------------------------------------------

ANSWER_TASKSET = '''
import verifiers.v1 as vf

class AnswerData(vf.TaskData):
    answer: str

class AnswerTask(vf.Task[AnswerData, vf.State, vf.TaskConfig]):
    @vf.reward(weight=2.0)
    async def correct(self, trace: vf.Trace) -> float:
        return float(trace.last_reply == self.data.answer)

class AnswerTaskset(vf.Taskset[AnswerTask, vf.TasksetConfig]):
    def load(self):
        for a, b in [(2, 3), (4, 5)]:
            yield AnswerTask(AnswerData(prompt=f"{a}+{b}?", answer=str(a + b)), self.config.task)

__all__ = ["AnswerTaskset"]
'''

HILO_ENV = '''
import verifiers.v1 as vf

class HiLoData(vf.TaskData):
    secret: int

class HiLoTask(vf.Task[HiLoData, vf.State, vf.TaskConfig]):
    @vf.metric
    async def guesses(self, trace: vf.Trace) -> float:
        return float(trace.num_turns)

    @vf.stop
    async def gave_up(self, trace: vf.Trace) -> bool:
        return trace.last_reply == "give up"

class HiLoTaskset(vf.Taskset[HiLoTask, vf.TasksetConfig]):
    def load(self):
        for secret in (3, 8):
            yield HiLoTask(HiLoData(prompt="Guess my number (1-10).", system_prompt="Answer with a number.",
                                    secret=secret), self.config.task)

class HiLoEnvConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig()

class HiLoEnv(vf.Env[HiLoEnvConfig]):
    """The env speaks as the user: a hint after each wrong guess, at most 4 guesses."""
    async def run(self, task, agents):
        won, guesses = False, 0
        async with agents.player.interaction(task) as interaction:
            segment = await interaction.turn()
            while not segment.terminated:
                if not segment.last_reply.isdigit():  # after a @stop, this turn is terminated
                    segment = await interaction.turn("Numbers only.")
                    continue
                guess, guesses = int(segment.last_reply), guesses + 1
                if guess == task.data.secret or guesses == 4:
                    won = guess == task.data.secret
                    break
                segment = await interaction.turn("higher" if guess < task.data.secret else "lower")
        interaction.trace.record_reward("won", float(won))

__all__ = ["HiLoTaskset", "HiLoEnv"]
'''


@pytest.fixture(scope="module")
def verifiers_tasksets(tmp_path_factory):
    """Two taskset packages written to a directory on sys.path (verifiers imports a taskset id
    as a module): `alignkit_vf_answer` (single-turn, SingleAgentEnv) and `alignkit_vf_hilo`
    (a multi-turn Env of its own)."""
    pytest.importorskip("verifiers.v1")
    root = tmp_path_factory.mktemp("vf-tasksets")
    (root / "alignkit_vf_answer.py").write_text(textwrap.dedent(ANSWER_TASKSET))
    (root / "alignkit_vf_hilo.py").write_text(textwrap.dedent(HILO_ENV))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def test_verifiers_single_turn_taskset_by_example_id(verifiers_tasksets):
    env = load_env("verifiers:alignkit_vf_answer")()
    assert env.reset({"example_id": 1}) == [{"role": "user", "content": "4+5?"}]
    assert env.step([assistant("9")]) == (None, 2.0, True, {"reward_correct": 2.0})  # weight 2
    env.reset({"example_id": 0})
    assert env.step([assistant("6")])[1:3] == (0.0, True)


def test_verifiers_row_is_the_task_data(verifiers_tasksets):
    env = adapter_factory("verifiers:alignkit_vf_answer")()
    assert env.reset({"prompt": "1+1?", "answer": "2", "other": 0}) == [{"role": "user", "content": "1+1?"}]
    assert env.step([assistant("2")])[1] == 2.0
    with pytest.raises(ValueError, match="not a AnswerData: bad or missing answer"):
        env.reset({"prompt": "1+1?"})
    with pytest.raises(ValueError, match="the taskset has 2 tasks; the row asks for example_id 7"):
        env.reset({"example_id": 7})


def test_verifiers_multi_turn_env_plays_to_the_end(verifiers_tasksets):
    env = load_env("verifiers:alignkit_vf_hilo")()
    messages = env.reset({"example_id": 1})  # secret 8
    assert messages == [{"role": "system", "content": "Answer with a number."},
                        {"role": "user", "content": "Guess my number (1-10)."}]
    hints = []
    for guess in ("5", "9", "8"):
        messages.append(assistant(guess))
        reply, reward, done, info = env.step(messages)
        if done:
            break
        assert reward == 0.0
        hints.append(reply[0]["content"])
        messages += reply
    assert hints == ["higher", "lower"]
    assert (reply, reward, done) == (None, 1.0, True)
    assert info == {"guesses": 3.0, "reward_won": 1.0}


def test_verifiers_stop_hook_and_lost_game(verifiers_tasksets):
    env = adapter_factory("verifiers:alignkit_vf_hilo")()
    env.reset({"example_id": 0})
    assert env.step([assistant("give up")])[1:3] == (0.0, True)  # @vf.stop gave_up ends it
    env.reset({"example_id": 0})  # secret 3: four wrong guesses lose
    for guess in ("9", "8", "7"):
        assert env.step([assistant(guess)])[2] is False
    assert env.step([assistant("6")])[1:3] == (0.0, True)


def test_verifiers_abandoned_episode_and_threads(verifiers_tasksets):
    """A reset mid-episode starts afresh; reset and step may come from different threads."""
    env = adapter_factory("verifiers:alignkit_vf_hilo")()
    env.reset({"example_id": 0})
    env.step([assistant("1")])  # the runner stops here (max_turns) and resets
    with ThreadPoolExecutor(max_workers=2) as pool:
        pool.submit(env.reset, {"example_id": 0}).result()
        result = pool.submit(env.step, [assistant("3")]).result()
    assert result == (None, 1.0, True, {"guesses": 1.0, "reward_won": 1.0})
    env.close()


def test_verifiers_unsupported_task_features(verifiers_tasksets):
    """What needs a sandbox, a judge model or tool servers is refused by name, not skipped."""
    import verifiers.v1 as vf

    from alignkit.agents.adapter_verifiers import unsupported_features

    class Boxed(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
        async def setup(self, trace, runtime):
            return None

        @vf.reward
        async def tests_pass(self, trace: vf.Trace, runtime) -> float:
            return 1.0

        @vf.reward
        async def offline(self, trace: vf.Trace) -> float:
            return 1.0

    assert unsupported_features(Boxed(vf.TaskData(prompt="x"))) == [
        "Task.setup (runs in a sandbox runtime)", "tests_pass (needs a runtime)"]


def test_verifiers_bad_specs(verifiers_tasksets):
    with pytest.raises(ValueError, match="verifiers cannot find taskset 'no_such_taskset'"):
        adapter_factory("verifiers:no_such_taskset")
    with pytest.raises(ValueError, match=r"game: Input should be 'Wordle-v0'") as err:
        adapter_factory("verifiers:textarena,game=Chess-v0")
    assert "\n" not in str(err.value)
    env = adapter_factory("verifiers:alignkit_vf_answer")()
    with pytest.raises(ValueError, match="step with no turn pending"):
        env.step([assistant("1")])


# --- TRL environment_factory classes -----------------------------------------------------------

TRL_ENV = '''
class Counter:
    """A TRL-style environment: public methods are tools, reset may return an observation."""

    def __init__(self):
        self.total = 0

    def reset(self, **kwargs):
        self.total = kwargs.get("start", 0)
        return f" (the counter starts at {self.total})"

    def add(self, amount: int) -> str:
        """Add to the counter.

        Args:
            amount: how much to add
        """
        self.total += amount
        return f"total={self.total}"

    async def double(self) -> int:
        """Double the counter."""
        self.total *= 2
        return self.total

    def _helper(self):
        return None

    def get_reward(self) -> float:
        return float(self.total == 10)


class Plain:
    def reset(self, **kwargs):
        return None
'''


@pytest.fixture()
def trl_file(tmp_path):
    path = tmp_path / "trl_envs.py"
    path.write_text(textwrap.dedent(TRL_ENV))
    return path


def test_trl_environment_runs_unchanged(trl_file):
    env = load_env(f"trl:{trl_file}:Counter")()
    assert [tool.__name__ for tool in env.tools()] == ["add", "double"]  # not reset/get_reward/_*
    from transformers.utils import get_json_schema  # what a chat template's tool list is built from

    assert get_json_schema(env.tools()[0])["function"]["parameters"]["properties"] == {
        "amount": {"type": "integer", "description": "how much to add"}}
    row = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "Reach 10."}],
           "start": 3}
    messages = env.reset(row)
    assert messages[-1] == {"role": "user", "content": "Reach 10. (the counter starts at 3)"}
    assert row["prompt"][-1]["content"] == "Reach 10."  # the row is left untouched
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"amount": 2}'}},
             {"id": "c2", "type": "function", "function": {"name": "double", "arguments": {}}}]
    reply, reward, done, _ = env.step([*messages, assistant("", tool_calls=calls)])
    assert (reward, done) == (0.0, False)
    assert reply == [{"role": "tool", "name": "add", "content": "total=5", "tool_call_id": "c1"},
                     {"role": "tool", "name": "double", "content": "10", "tool_call_id": "c2"}]
    assert env.step([*messages, assistant("Done: 10")]) == (None, 1.0, True, {})


def test_trl_tool_errors_are_feedback_and_reward_defaults_to_zero(trl_file):
    env = adapter_factory(f"trl:{trl_file}:Counter")()
    env.reset({"prompt": "Reach 10."})
    bad = [{"function": {"name": "add", "arguments": "{not json"}},
           {"function": {"name": "add", "arguments": {"amount": "x", "extra": 1}}},
           {"function": {"name": "launch", "arguments": {}}}]
    contents = [m["content"] for m in env.step([assistant("", tool_calls=bad)])[0]]
    assert all(c.startswith("Error:") for c in contents)  # one ToolRunner's messages, as for --tools
    assert "arguments are not JSON" in contents[0]
    assert "bad arguments for add: unexpected argument 'extra'" in contents[1]
    assert "unknown tool 'launch'" in contents[2]
    plain = adapter_factory(f"trl:{trl_file}:Plain")()
    assert plain.reset({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    assert plain.tools() == []
    assert plain.step([assistant("bye")]) == (None, 0.0, True, {})
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        plain.reset({"question": "hi"})


def test_trl_bad_specs(trl_file):
    with pytest.raises(ValueError, match="write trl:package.module:Class"):
        adapter_factory("trl:Counter")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        adapter_factory(f"trl:{trl_file}:Missing")
