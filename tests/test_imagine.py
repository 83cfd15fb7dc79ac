"""`alignkit imagine` (synthetic multi-turn dialogues) and `filtered_bc` (behaviour cloning over
agent turns): task-file errors, the dialogue file end to end on a tiny model, reproducibility,
the judge's forward pass, the agent-turn mask token by token, the reward filter, and a short
training run that moves the agent towards the high-reward dialogues."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.cli import VERBS, main
from alignkit.data import RowTable
from alignkit.data.turns import (
    collate_turns,
    conversation_pieces,
    tokenize_conversation,
    tokenize_turns,
)
from alignkit.lab.imagine import (
    ImagineOptions,
    answer_token_ids,
    clean_message,
    judge_yes_probability,
    run_imagine,
    user_view,
)
from alignkit.lab.imagine_task import (
    ImagineTask,
    Persona,
    load_task,
    parse_task,
    persona_behaviours,
)
from alignkit.models import load_model, sequence_logps
from alignkit.testing import build_tiny_tokenizer
from alignkit.training.offline.turns import FilteredBCTask, reward_threshold
from alignkit.training.run.config import TrainConfig

TASK = {
    "task": "You are a support agent. Ask for the order number before answering.",
    "agent_role": "support agent",
    "user_role": "customer",
    "n_personas": 3,
    "suboptimal_fraction": 0.5,
}
# SmolLM2-Instruct's chat template (a default system prompt when the conversation has none)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
DIALOGUE = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "The movie was late."},
    {"role": "assistant", "content": "What is your order number?"},
    {"role": "user", "content": "It is 42."},
    {"role": "assistant", "content": "Thank you, the answer is 4."},
]


def write_task(tmp_path, data, name="task.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- the task file


@pytest.mark.parametrize(
    "data, key",
    [
        ({"agent_role": "agent"}, "'task' is missing"),
        ({**TASK, "rewards": "vader"}, "'rewards' is unknown"),
        ({**TASK, "n_personas": 0}, "'n_personas' must be an integer >= 1"),
        ({**TASK, "suboptimal_fraction": 1.5}, "'suboptimal_fraction' must be a number in [0, 1]"),
        ({"task": "t", "personas": []}, "'personas' must be a non-empty list"),
        ({"task": "t", "personas": [{"description": "a", "suboptimal": "yes"}]}, "'personas[1].suboptimal'"),
        ({"task": "t", "personas": [{"text": "a"}]}, "'personas[1].text' is unknown"),
        ({"task": "t", "personas": ["a"], "n_personas": 2}, "'n_personas' is for personas the model writes"),
        ({"task": "t", "reward": {"judge": True, "spec": "vader"}}, "'reward.spec' is unknown with judge"),
        ({"task": "t", "reward": {"target": 3}}, "'reward.spec' is missing"),
        ({"task": "", "agent_role": "a"}, "'task' must be a non-empty string"),
        (["task"], "expected a mapping"),
    ],
)
def test_a_bad_task_file_is_one_error_naming_the_file_and_key(tmp_path, data, key):
    path = write_task(tmp_path, data)
    with pytest.raises(ValueError) as error:
        load_task(path)
    assert str(path) in str(error.value) and key in str(error.value)


def test_task_file_errors_reach_the_command_line_as_one_line(tmp_path, capsys):
    path = write_task(tmp_path, {"task": "t", "turns": 3})
    assert main(["imagine", "--task", str(path), "--out", str(tmp_path / "d.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"alignkit imagine: error: {path}: key 'turns' is unknown" in err
    assert not (tmp_path / "d.jsonl").exists()
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    assert main(["imagine", "--task", str(tmp_path / "broken.yaml")]) == 2
    assert "broken.yaml: not valid YAML" in capsys.readouterr().err
    assert "imagine" in VERBS


def test_parse_task_defaults_and_personas():
    task = parse_task({"task": "Help.", "personas": ["A teacher.", {"description": "A nurse.", "suboptimal": True}]},
                      "t.yaml")
    assert (task.agent_role, task.user_role) == ("assistant", "user")
    assert [(p.text, p.suboptimal) for p in task.personas] == [("A teacher.", False), ("A nurse.", True)]
    assert task.reward.judge and task.reward.question == "Did the assistant achieve its goal?"
    spec = parse_task({"task": "Help.", "reward": {"spec": "length", "target": 5}}, "t.yaml").reward
    assert (spec.judge, spec.spec, spec.kwargs) == (False, "length", {"target": 5})


def test_persona_behaviours_put_the_suboptimal_share_first():
    """round(0.5 * 3) = 2 suboptimal personas, then one cooperative one."""
    assert [bad for _, bad in persona_behaviours(3, 0.5)] == [True, True, False]
    assert [bad for _, bad in persona_behaviours(4, 0.0)] == [False] * 4
    assert all(bad for _, bad in persona_behaviours(7, 1.0))


# --------------------------------------------------------------------------- pieces of imagine


def test_clean_message_drops_labels_and_the_other_side():
    assert clean_message("  Customer: my order is late.", "customer", "support agent") == "my order is late."
    assert clean_message("Sure.\nSupport agent: What is it?\nCustomer: 12", "customer", "support agent") == "Sure."
    assert clean_message("I ordered a book.\nThen: nothing", "customer", "support agent") == (
        "I ordered a book.\nThen: nothing")


def test_user_view_swaps_roles_and_never_shows_the_agent_prompt():
    task = ImagineTask(task="SECRET agent instructions", agent_role="agent", user_role="client")
    persona = Persona("A busy nurse.", True)
    opening = user_view(task, persona, [])
    assert [m["role"] for m in opening] == ["system", "user"] and "A busy nurse." in opening[0]["content"]
    view = user_view(task, persona, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "order?"}])
    assert [(m["role"], m["content"]) for m in view[1:]] == [("assistant", "hi"), ("user", "order?")]
    assert all("SECRET" not in m["content"] for m in view)


def test_judge_reads_p_yes_from_one_forward_pass(tiny_model_dir):
    """P(yes) = sum_yes p / (sum_yes p + sum_no p) at the next position; left padding in a
    batch changes nothing."""
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    requests = [[{"role": "user", "content": "Was it good? Answer yes or no."}],
                [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. yes or no?"}]]
    batched = judge_yes_probability(model, tokenizer, requests, batch_size=2)
    yes, no = answer_token_ids(tokenizer)
    assert set(yes).isdisjoint(no) and yes and no
    for request, got in zip(requests, batched, strict=True):
        text = tokenizer.apply_chat_template(request, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        expected = probs[yes].sum() / (probs[yes].sum() + probs[no].sum())
        assert got == pytest.approx(float(expected), abs=1e-5)


# --------------------------------------------------------------------------- imagine end to end


REWARD_FILE = '''
def turns(prompts, completions, messages, persona, suboptimal):
    # one point per message, +10 when the transcript (the completion) names both roles
    return [len(m) + (10.0 if "customer: " in c and "support agent: " in c else 0.0)
            for m, c in zip(messages, completions)]
'''


def imagine(tmp_path, tiny_model_dir, name="d.jsonl", seed=0, **task_changes):
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    data = {**TASK, "reward": f"{tmp_path / 'rewards.py'}:turns", **task_changes}
    task = write_task(tmp_path, {key: value for key, value in data.items() if value is not None})
    out = tmp_path / name
    options = ImagineOptions(task=str(task), model=str(tiny_model_dir), out=str(out), n=5, max_turns=2,
                             seed=seed, max_new_tokens=6, batch_size=4, device="cpu", no_progress=True)
    return out, run_imagine(options)


def test_imagine_writes_alternating_dialogues_rewards_and_a_manifest(tmp_path, tiny_model_dir):
    out, manifest = imagine(tmp_path, tiny_model_dir)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    for d, row in enumerate(rows):
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
        assert row["messages"][0]["content"] == TASK["task"]
        assert row["reward"] == 14.0  # 4 messages + both role names in the transcript
        assert row["suboptimal"] is (d % 3 < 2) and row["persona"].endswith(".")
        assert (row["seed"], row["id"]) == (0, d)
    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"] == {"dialogues": 5, "turns": 2, "messages_per_dialogue": 4, "personas": 3,
                                  "suboptimal_dialogues": 4, "empty_messages": manifest["counts"]["empty_messages"]}
    assert manifest["reward_stats"]["mean"] == 14.0 and manifest["reward_stats"]["std"] == 0.0
    assert [p["suboptimal"] for p in manifest["personas"]] == [True, True, False]
    assert "Behaviour: vague" in manifest["personas"][0]["text"]


def test_the_same_seed_writes_the_same_file(tmp_path, tiny_model_dir):
    first, _ = imagine(tmp_path, tiny_model_dir, "a.jsonl")
    again, _ = imagine(tmp_path, tiny_model_dir, "b.jsonl")
    other, _ = imagine(tmp_path, tiny_model_dir, "c.jsonl", seed=1)
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_imagine_with_given_personas_and_the_judge(tmp_path, tiny_model_dir):
    out, manifest = imagine(tmp_path, tiny_model_dir, personas=["A teacher.", {"description": "A nurse.",
                            "suboptimal": True}], reward={"judge": True, "question": "Was the order number asked?"},
                            n_personas=None, suboptimal_fraction=None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["persona"] for r in rows] == ["A teacher.", "A nurse."] * 2 + ["A teacher."]
    assert [r["suboptimal"] for r in rows] == [False, True, False, True, False]
    assert all(0.0 < r["reward"] < 1.0 for r in rows)
    assert manifest["reward"] == "judge: Was the order number asked?"


# --------------------------------------------------------------------------- the agent-turn mask


def runs(ids, mask):
    """Maximal runs of equal mask values: [(is_agent, token ids), ...]."""
    out = []
    for token, flag in zip(ids, mask, strict=True):
        if out and out[-1][0] == flag:
            out[-1][1].append(token)
        else:
            out.append((flag, [token]))
    return out


@pytest.mark.parametrize("template", ["chatml", "smollm2"])
@pytest.mark.parametrize("system", [True, False])
def test_the_mask_covers_exactly_the_agent_turns_token_by_token(template, system):
    tokenizer = build_tiny_tokenizer()
    if template == "smollm2":
        tokenizer.chat_template = SMOLLM2_TEMPLATE
    messages = DIALOGUE if system else DIALOGUE[1:]
    ids, mask = tokenize_conversation(messages, tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == full.rstrip("\n")  # the whole conversation, ending at the last eos
    pieces = runs(ids, mask)
    agent = [tokenizer.decode(t) for flag, t in pieces if flag]
    assert agent == ["What is your order number?<|im_end|>", "Thank you, the answer is 4.<|im_end|>"]
    context = [tokenizer.decode(t) for flag, t in pieces if not flag]
    assert context[1] == "\n<|im_start|>user\nIt is 42.<|im_end|>\n<|im_start|>assistant\n"
    assert context[0].endswith("<|im_start|>user\nThe movie was late.<|im_end|>\n<|im_start|>assistant\n")
    # each agent turn's ids are those the model emits after that turn's generation prompt
    for turn, (_, token_ids) in zip([2, 4], [p for p in pieces if p[0]], strict=True):
        content = messages[turn - (0 if system else 1)]["content"]
        assert token_ids == tokenizer(content + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert mask.count(True) == sum(len(t) for f, t in pieces if f)


def test_collated_mask_is_the_agent_mask_and_pads_are_off():
    tokenizer = build_tiny_tokenizer()
    table = RowTable([{"messages": DIALOGUE, "reward": 1.0}, {"messages": DIALOGUE[:3], "reward": 0.0}])
    examples, stats = tokenize_turns(table, tokenizer, max_length=512)
    batch = collate_turns(examples, tokenizer.pad_token_id)
    for n, ex in enumerate(examples):
        assert batch["response_mask"][n, : ex.length].tolist() == ex.agent_mask
        assert not batch["response_mask"][n, ex.length :].any()
    assert batch["reward"].tolist() == [1.0, 0.0] and stats.truncated_responses == 0
    cut = examples[0].agent_mask.index(True) + 3  # inside both conversations' first agent turn
    short, stats = tokenize_turns(table, tokenizer, max_length=cut)
    assert all(ex.length == cut and ex.agent_tokens == 3 for ex in short) and stats.truncated_responses == 2


def test_a_conversation_without_an_agent_turn_is_an_error_naming_the_row():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="no assistant message"):
        conversation_pieces(DIALOGUE[:2], tokenizer)
    table = RowTable([{"messages": DIALOGUE}, {"messages": DIALOGUE[:2]}], [("d.jsonl", 1), ("d.jsonl", 2)])
    with pytest.raises(ValueError, match="d.jsonl.*2.*no assistant message"):
        tokenize_turns(table, tokenizer, max_length=64)


def test_a_cut_before_the_first_agent_turn_is_an_error_naming_the_row():
    """Keeping the start of a conversation must keep some agent token, else the row would
    train on nothing (an all-context batch once crashed backward with a bare RuntimeError)."""
    tokenizer = build_tiny_tokenizer()
    ids, mask = tokenize_conversation(DIALOGUE, tokenizer)
    first = mask.index(True)
    table = RowTable([{"messages": DIALOGUE}], [("d.jsonl", 7)])
    assert tokenize_turns(table, tokenizer, max_length=first + 1)[0][0].agent_tokens == 1
    with pytest.raises(ValueError, match=f"d.jsonl.*7.*starts at token {first}, past --max-length {first}"):
        tokenize_turns(table, tokenizer, max_length=first)


# --------------------------------------------------------------------------- the filter


def test_reward_threshold_worked_examples():
    """rewards [0, 3, 1, 2]: top_fraction 0.5 keeps the 2 best (>= 2); 0.6 -> ceil(2.4) = 3 (>= 1);
    min_reward 2.5 alone -> 2.5; both -> the stricter."""
    rewards = [0.0, 3.0, 1.0, 2.0]
    assert reward_threshold(rewards, min_reward=None, top_fraction=1.0) == -math.inf
    assert reward_threshold(rewards, min_reward=None, top_fraction=0.5) == 2.0
    assert reward_threshold(rewards, min_reward=None, top_fraction=0.6) == 1.0
    assert reward_threshold(rewards, min_reward=2.5, top_fraction=1.0) == 2.5
    assert reward_threshold(rewards, min_reward=0.5, top_fraction=0.5) == 2.0
    with pytest.raises(ValueError, match="top_fraction"):
        reward_threshold(rewards, min_reward=None, top_fraction=0.0)


def filtered(hparams, rewards, eval_rewards=()):
    tokenizer = build_tiny_tokenizer()
    task = FilteredBCTask(TrainConfig(algorithm="filtered_bc", hparams=hparams))
    splits = {}
    for name, values in (("train", rewards), ("eval", eval_rewards)):
        table = RowTable([{"messages": DIALOGUE, "reward": r} for r in values]) if values else None
        examples = task.tokenize(table, tokenizer)[0] if table is not None else []
        splits[name] = (table, examples)
    task.prepare(None, tokenizer, splits, None)
    return task, {name: [ex.row for ex in examples] for name, (_, examples) in splits.items()}


def test_the_filter_keeps_exactly_the_rows_at_or_above_the_threshold():
    rewards = [0.2, 0.9, 0.5, 0.7, 0.1, 0.5]
    task, kept = filtered({"min_reward": 0.5}, rewards, eval_rewards=[0.4, 0.6])
    assert kept == {"train": [1, 2, 3, 5], "eval": [1]}
    assert task.filter_counts == {"train": (4, 6), "eval": (1, 2)}
    task, kept = filtered({"top_fraction": 0.5}, rewards)
    assert kept["train"] == [1, 2, 3, 5] and task.threshold == 0.5  # the 3 best (0.9, 0.7, 0.5) and the tie
    assert filtered({}, rewards)[1]["train"] == list(range(6))  # no filter: plain multi-turn BC
    with pytest.raises(ValueError, match="no training dialogue"):
        filtered({"min_reward": 5}, rewards)


def test_bad_filter_settings_and_rows_are_errors():
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        FilteredBCTask(TrainConfig(algorithm="filtered_bc", hparams={"threshold": 1}))
    with pytest.raises(ValueError, match="min_reward must be a number"):
        FilteredBCTask(TrainConfig(algorithm="filtered_bc", hparams={"min_reward": "high"}))
    with pytest.raises(ValueError, match="row 2.*'reward'.*finite number"):
        filtered({"min_reward": 0.5}, [0.5, None])


# --------------------------------------------------------------------------- training over turns


def planted_dialogues(n: int) -> list[dict]:
    """Half the dialogues ask for the order number (reward 1), half answer at once (reward 0)."""
    rows = []
    for i in range(n):
        good = i % 2 == 0
        reply = "What is your order number?" if good else "The answer is 4."
        rows.append({"messages": [DIALOGUE[0], {"role": "user", "content": f"The movie was late. {i % 5}"},
                                  {"role": "assistant", "content": reply},
                                  {"role": "user", "content": "It is 42."},
                                  {"role": "assistant", "content": reply}],
                     "reward": 1.0 if good else 0.0})
    return rows


def agent_logps(model_dir, rows) -> torch.Tensor:
    """Mean log-prob per agent token of each row, (N,)."""
    model, tokenizer = load_model(str(model_dir), device="cpu")
    batch = collate_turns(tokenize_turns(RowTable(rows), tokenizer, max_length=512)[0], tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return sums / counts


def test_filtered_bc_moves_the_agent_towards_the_high_reward_dialogues(tiny_model_dir, tmp_path):
    import alignkit

    rows = planted_dialogues(16)
    probe = planted_dialogues(2)  # one good, one bad: the same context, different agent turns
    before = agent_logps(tiny_model_dir, probe)
    result = alignkit.train("filtered_bc", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "run",
                            max_steps=30, batch_size=4, lr=3e-3, min_reward=1.0, seed=0, device="cpu")
    after = agent_logps(result.final_dir, probe)
    gap_before, gap_after = float(before[0] - before[1]), float(after[0] - after[1])
    assert gap_after > gap_before + 1.0, (gap_before, gap_after)
    assert after[0] > before[0] + 1.0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    # plain multi-turn BC on the same dialogues (no filter) clones both behaviours alike
    unfiltered = alignkit.train("filtered_bc", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "bc",
                                max_steps=30, batch_size=4, lr=3e-3, seed=0, device="cpu")
    cloned = agent_logps(unfiltered.final_dir, probe)
    assert abs(float(cloned[0] - cloned[1])) < 0.5 < gap_after - gap_before
