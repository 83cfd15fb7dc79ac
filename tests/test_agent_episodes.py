"""Multi-turn rollouts (alignkit.agents): the token sequence of a templated conversation and its
policy mask, on two real template shapes; the episode runner's turn limits, token budget,
tool errors and environment timeouts, with a scripted policy (an engine that answers from a
function of the conversation text, so every token is known)."""

from __future__ import annotations

import time

import pytest
import torch
from agent_templates import llama_tokenizer, smollm2_tokenizer

from alignkit.agents.episodes import EpisodeRunner, EpisodeSettings
from alignkit.agents.template import Conversation, assistant_closing, render
from alignkit.agents.tools import (
    ToolCall,
    assistant_message,
    format_tool_call,
    parse_assistant_turn,
)
from alignkit.rollout import Rollout
from alignkit.training.online.roles import SequenceBatch


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: digits and + - * / only, e.g. "2+3".
    """
    if not set(expression) <= set("0123456789+-*/ ()"):
        raise ValueError(f"not arithmetic: {expression}")
    return str(eval(expression))  # noqa: S307  (the characters are checked above)


def slow(seconds: str) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep.
    """
    time.sleep(float(seconds))
    return "woke"


class ScriptedEngine:
    """A rollout engine whose policy is `reply(conversation_text) -> str`: it writes the reply's
    tokens then EOS (or, past `max_new_tokens`, stops there with finish "length")."""

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply, self.calls = tokenizer, reply, 0

    def generate(self, prompt_ids, n, sampling):
        self.calls += 1
        rows = []
        for prompt in prompt_ids:
            text = self.tokenizer.decode(prompt, skip_special_tokens=False)
            ids = self.tokenizer(self.reply(text), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(ids)
        width = max(len(r) for r in rows)
        cut = [r[: sampling.max_new_tokens] for r in rows]
        ids = torch.full((len(rows), min(width, sampling.max_new_tokens)), self.tokenizer.pad_token_id)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, r in enumerate(cut):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        finish = ["stop" if len(r) == len(full) else "length" for r, full in zip(cut, rows, strict=True)]
        return Rollout(list(prompt_ids), ids, torch.where(mask, -0.5, 0.0), mask, finish,
                       torch.arange(len(rows)))


class Countdown:
    """Asks three questions; a turn's reward is 1 when the answer contains "yes"."""

    def reset(self, row):
        self.left = int(row.get("turns", 3))
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        self.left -= 1
        reward = float("yes" in messages[-1]["content"])
        if self.left == 0:
            return None, reward, True, {"left": 0}
        return {"role": "user", "content": "again?"}, reward, False, {"left": self.left}


@pytest.mark.parametrize("make_tokenizer", [smollm2_tokenizer, llama_tokenizer], ids=["smollm2", "llama31"])
def test_policy_mask_is_exactly_the_policy_tokens(make_tokenizer):
    """A conversation of two policy turns (a tool call, then an answer) built turn by turn: the
    tokens under the policy mask are the sampled turns, token for token; the rest decodes to
    the template's own text; the whole sequence decodes to the template's rendering."""
    tokenizer = make_tokenizer()
    closing = assistant_closing(tokenizer)
    fmt = "llama3" if "ipython" in tokenizer.chat_template else "hermes"
    tools = None
    if fmt == "llama3":
        from alignkit.agents.tools import tool_schemas

        tools = tool_schemas([calculator])
    conversation = Conversation.start(tokenizer, [{"role": "user", "content": "What is 2+3?"}], tools)
    call_text = format_tool_call(ToolCall("calculator", {"expression": "2+3"}, raw=""), fmt)
    turns = [call_text, "The answer is 5."]
    sampled = []
    for i, text in enumerate(turns):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sampled.append(ids)
        content, calls = parse_assistant_turn(text, fmt)
        assert len(calls) == (1 if i == 0 else 0)
        conversation.add_policy_turn(ids, [-1.0] * len(ids), assistant_message(text if fmt == "hermes" else content, calls))
        if i == 0:
            conversation.add_replies(tokenizer, [{"role": "tool", "name": "calculator", "content": "5"}], closing)
    response = torch.tensor(conversation.response_ids)
    env = torch.tensor(conversation.env)
    assert response[~env].tolist() == sampled[0] + sampled[1]
    assert conversation.logprobs == [-1.0 if not e else 0.0 for e in conversation.env]
    env_text = tokenizer.decode(response[env].tolist(), skip_special_tokens=False)
    assert "5" in env_text and "What is" not in env_text
    whole = tokenizer.decode(conversation.ids, skip_special_tokens=False)
    rendered = render(tokenizer, conversation.messages, tools=tools)
    assert whole + closing[len(tokenizer.eos_token):] == rendered

    # the batch the trainer sees: its masks are the policy's tokens, in sequence and response coordinates
    rollout = Rollout([conversation.prompt_ids], response.unsqueeze(0), torch.zeros(1, len(response)),
                      torch.ones(1, len(response), dtype=torch.bool), ["stop"], torch.zeros(1, dtype=torch.long),
                      env_mask=env.unsqueeze(0))
    batch = SequenceBatch.from_rollout(rollout, tokenizer.pad_token_id)
    assert batch.input_ids[0][batch.sequence_mask[0]].tolist() == sampled[0] + sampled[1]
    assert batch.response_mask.sum().item() == len(sampled[0]) + len(sampled[1])
    assert batch.select(torch.tensor([0])).response_mask.shape[1] == len(response)  # holes keep the width


def run_episodes(reply, env=Countdown, rows=None, n=1, tools=None, turn_tokens=96, **settings):
    tokenizer = smollm2_tokenizer()
    runner = EpisodeRunner(tokenizer, env, tools, EpisodeSettings(**settings))
    from alignkit.rollout import SamplingParams

    rows = rows or [{"prompt": "Say yes."}]
    try:
        return runner.run(ScriptedEngine(tokenizer, reply), rows, n, SamplingParams(max_new_tokens=turn_tokens, seed=0)), tokenizer
    finally:
        runner.close()


def test_turn_rewards_sit_at_each_turns_last_token_and_sum_to_the_return():
    episodes, _ = run_episodes(lambda text: "yes" if text.count("again") != 1 else "no")
    assert episodes.turn_rewards == [[1.0, 0.0, 1.0]]
    assert episodes.returns.tolist() == [2.0]
    dense = episodes.turn_rewards_dense()
    ends = episodes.turn_ends[0]
    assert dense[0, ends].tolist() == [1.0, 0.0, 1.0] and dense.sum().item() == 2.0
    assert ends[-1] == episodes.rollout.lengths[0].item() - 1  # the sequence ends with the policy's turn
    assert episodes.metrics["turns/mean"] == 3 and episodes.metrics["episode/finish_done"] == 1.0
    assert episodes.metrics["env/left"] == pytest.approx(1.0)  # info values averaged: (2 + 1 + 0) / 3
    assert episodes.rollout.finish_reason == ["stop"]


def test_max_turns_and_the_token_budget_end_an_episode():
    episodes, _ = run_episodes(lambda text: "yes", rows=[{"prompt": "Say yes.", "turns": 9}], max_turns=2)
    assert [len(r) for r in episodes.turn_rewards] == [2]
    assert episodes.rollout.extras["episode_finish"] == ["turns"]
    episodes, _ = run_episodes(lambda text: "yes " * 6, rows=[{"prompt": "Say yes.", "turns": 9}],
                               max_episode_tokens=30)
    assert episodes.rollout.extras["episode_finish"] == ["budget"]
    assert episodes.rollout.lengths[0].item() <= 30
    assert not episodes.rollout.env_mask[0, episodes.rollout.lengths[0] - 1]  # ends with the policy's token


def test_a_turn_cut_by_its_token_limit_is_closed_and_answered():
    """Every turn runs past 32 tokens: the template closes each, the environment answers, and
    the rollout's finish is "length" (its last turn was cut)."""
    tokenizer = smollm2_tokenizer()
    episodes, _ = run_episodes(lambda text: "yes " * 40, turn_tokens=32)
    assert episodes.rollout.finish_reason == ["length"] and episodes.turn_rewards == [[1.0, 1.0, 1.0]]
    assert episodes.metrics["turns/truncated_fraction"] == 1.0
    env_text = tokenizer.decode(episodes.rollout.response_ids[0][episodes.rollout.env_mask[0]].tolist())
    assert env_text.startswith("<|im_end|>\n<|im_start|>user\nagain?")  # the closing the policy did not write


def test_tool_calls_errors_and_timeouts_reach_the_model_as_messages():
    calls = {
        0: format_tool_call(ToolCall("calculator", {"expression": "2+3"}, raw=""), "hermes"),
        1: format_tool_call(ToolCall("calculator", {"expression": "import os"}, raw=""), "hermes"),
        2: format_tool_call(ToolCall("slow", {"seconds": "1.0"}, raw=""), "hermes"),
        3: format_tool_call(ToolCall("nope", {}, raw=""), "hermes"),
    }

    def reply(text):
        return calls.get(text.count("<|im_start|>tool"), "yes, done")

    episodes, _ = run_episodes(reply, rows=[{"prompt": "Add.", "turns": 1}], tools=[calculator, slow],
                               max_turns=6, tool_timeout_s=0.2)
    tool_replies = [m["content"] for m in episodes.messages[0] if m["role"] == "tool"]
    assert tool_replies[0] == "5"
    assert all(r.startswith("Error:") for r in tool_replies[1:]), tool_replies
    assert episodes.metrics["tools/calls_per_episode"] == 4 and episodes.metrics["tools/errors"] == 3
    assert episodes.turn_rewards == [[0.0, 0.0, 0.0, 0.0, 1.0]]  # tool turns earn nothing; the answer does
    system = episodes.messages[0][0]
    assert system["role"] == "system" and "calculator" in system["content"]  # no template tools: described


class Stuck(Countdown):
    def step(self, messages):
        time.sleep(0.5)
        return super().step(messages)


def test_an_environment_past_its_timeout_ends_the_episode():
    episodes, _ = run_episodes(lambda text: "yes", env=Stuck, env_timeout_s=0.1)
    assert episodes.rollout.extras["episode_finish"] == ["env_timeout"]
    assert episodes.turn_rewards == [[0.0]] and episodes.metrics["episode/finish_env_timeout"] == 1.0


class Broken(Countdown):
    def step(self, messages):
        return "not a message", 1.0, False, {}


def test_an_environment_outside_the_protocol_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"row 0\): step: expected a message dict"):
        run_episodes(lambda text: "yes", env=Broken, rows=[{"prompt": "x", "__row__": 0}])


def test_finished_conversations_leave_the_batch():
    """Row 0 plays one turn, row 1 three: the engine's later calls carry only row 1."""
    tokenizer = smollm2_tokenizer()
    seen = []

    class Counting(ScriptedEngine):
        def generate(self, prompt_ids, n, sampling):
            seen.append(len(prompt_ids))
            return super().generate(prompt_ids, n, sampling)

    runner = EpisodeRunner(tokenizer, Countdown, None, EpisodeSettings())
    from alignkit.rollout import SamplingParams

    episodes = runner.run(Counting(tokenizer, lambda text: "yes"), [{"prompt": "a", "turns": 1}, {"prompt": "b", "turns": 3}],
                          2, SamplingParams(max_new_tokens=16, seed=0))
    runner.close()
    assert seen == [4, 2, 2]
    assert episodes.rollout.group_index.tolist() == [0, 0, 1, 1]
    assert [len(r) for r in episodes.turn_rewards] == [1, 1, 3, 3]


TRL_ENV = '''
class Counter:
    """A TRL environment_factory class: its public methods are tools."""

    def reset(self, **kwargs):
        self.total = 0
        return " Reach 5."

    def add(self, amount: int) -> str:
        """Add to the counter.

        Args:
            amount: how much to add.
        """
        self.total += amount
        return f"total={self.total}"

    def get_reward(self) -> float:
        return float(self.total == 5)
'''


def test_a_trl_environment_class_runs_in_the_episode_runner(tmp_path):
    """Its tools are offered (described in SmolLM2's system prompt), its step answers the tool
    turns from the slot's own instance, and get_reward scores the episode."""
    from alignkit.agents.protocol import load_env

    (tmp_path / "trl_env.py").write_text(TRL_ENV)
    call = format_tool_call(ToolCall("add", {"amount": 5}, raw=""), "hermes")

    def reply(text):
        return call if "total=" not in text else "done"

    episodes, _ = run_episodes(reply, env=load_env(f"trl:{tmp_path}/trl_env.py:Counter"),
                               rows=[{"prompt": "Count."}], n=2)
    assert episodes.returns.tolist() == [1.0, 1.0]  # each slot's own instance reached 5
    assert [m["content"] for m in episodes.messages[0] if m["role"] == "tool"] == ["total=5"]
    assert episodes.messages[0][1]["content"] == "Count. Reach 5."
    assert "add" in episodes.messages[0][0]["content"]
    assert episodes.metrics["tools/calls_per_episode"] == 1.0 and episodes.metrics["tools/errors"] == 0.0


def test_branches_share_the_roll_in_and_only_their_future_is_trained():
    """Reset turn h = 2 of 3: one roll-in turn, then two branches to the end. The branches'
    first tokens (the roll-in and the user's reply to it) are identical and masked; each
    branch trains on its own turns 2 and 3. A conversation that ends during the roll-in
    (h = 3 but the environment stops after 1 turn) branches at its last turn."""
    from alignkit.agents.branching import reset_turns, run_branched
    from alignkit.rollout import SamplingParams

    tokenizer = smollm2_tokenizer()
    counter = {"n": 0}

    def reply(text):  # every generated turn differs, so the branches' futures differ
        counter["n"] += 1
        return f"yes {counter['n']}"

    runner = EpisodeRunner(tokenizer, Countdown, None, EpisodeSettings(max_turns=3))
    rows = [{"prompt": "a", "turns": 3}, {"prompt": "b", "turns": 1}]
    episodes = run_branched(runner, ScriptedEngine(tokenizer, reply), rows, SamplingParams(max_new_tokens=16, seed=0),
                            [2, 3])
    runner.close()
    rollout = episodes.rollout
    assert rollout.group_index.tolist() == [0, 0, 1, 1]
    assert [len(r) for r in episodes.turn_rewards] == [3, 3, 1, 1]
    prefix = int(episodes.metrics["refuel/prefix_tokens"] * 2)  # the mean of rows 0-1 (the prefix) and 2-3 (none)
    shared = rollout.response_ids[0, :prefix]
    assert prefix > 0 and torch.equal(shared, rollout.response_ids[1, :prefix])
    assert rollout.env_mask[0, :prefix].all() and rollout.env_mask[1, :prefix].all()
    assert not torch.equal(rollout.response_ids[0], rollout.response_ids[1])  # different futures
    assert not rollout.env_mask[2, 0] and not rollout.env_mask[3, 0]  # ended in the roll-in: branched at turn 1
    assert episodes.metrics["refuel/reset_turn"] == 1.5  # (2 + 1) / 2
    assert len(reset_turns(5, 3, 7)) == 5 and reset_turns(5, 3, 7) == reset_turns(5, 3, 7)
    assert {h for h in reset_turns(200, 3, 1)} == {1, 2, 3}


def test_the_readme_environment_runs_as_written():
    """README's "Multi-turn and tools" example: a guessing game, played by a scripted policy
    that guesses 50 then the secret."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = text.split("class Guess:", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec("class Guess:" + code, namespace)  # noqa: S102  (our own README)
    episodes, _ = run_episodes(lambda text: "37" if "higher" in text or "lower" in text else "50",
                               env=namespace["Guess"], rows=[{"prompt": "", "secret": 37}])
    assert episodes.turn_rewards == [[0.0, 1.0]] and episodes.metrics["env/found"] == 0.5
    assert [m["content"] for m in episodes.messages[0] if m["role"] == "user"][1] == "lower"
