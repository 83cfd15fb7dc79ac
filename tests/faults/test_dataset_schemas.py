"""Fault cases of published dataset schemas: UltraFeedback-binarized and Anthropic HH-RLHF
files, exactly as published, train without edits and tokenise to what a user expects."""

from __future__ import annotations

import gzip
import json
import logging

import datasets
import pytest
from transformers import AutoTokenizer

from alignkit.training.offline.loop import load_table
from alignkit.training.offline.tasks import make_task
from alignkit.training.run.config import TrainConfig
from faults.helpers import assert_one_line_error, pairs, run_cli, write_jsonl


def message(role, text):
    return {"content": text, "role": role}  # the published key order


ULTRAFEEDBACK_TURNS = [
    ("Write a short review of the movie.", "The movie was wonderful and the acting was great.",
     "The film was terrible.", 8.5, 3.0),
    ("What is two plus two?", "The answer is 4.", "maybe 5", 10.0, 1.0),
    ("Please answer the question briefly and politely.", "Yes, happy to help.", "no", 7.0, 2.5),
    ("Say something about the quick brown fox.", "The quick brown fox jumps over the lazy dog.",
     "fox", 9.0, 4.0),
    ("Name a happy word.", "happy", "sad", 6.0, 5.0),
    ("I loved the story. Did you?", "I loved the story, the music and the characters.",
     "I hated every minute of this awful picture.", 8.0, 2.0),
]


def ultrafeedback_rows() -> list[dict]:
    """Rows in the schema of HuggingFaceH4/ultrafeedback_binarized (train_prefs): `prompt`
    text, `chosen`/`rejected` conversations that repeat the user turn, `messages`, scores."""
    rows = []
    for i, (prompt, good, bad, score_good, score_bad) in enumerate(ULTRAFEEDBACK_TURNS):
        chosen = [message("user", prompt), message("assistant", good)]
        rows.append({
            "prompt": prompt,
            "prompt_id": f"{i:064x}",
            "chosen": chosen,
            "rejected": [message("user", prompt), message("assistant", bad)],
            "messages": chosen,
            "score_chosen": score_good,
            "score_rejected": score_bad,
        })
    return rows


HH_ROWS = [
    {"chosen": "\n\nHuman: What is two plus two?\n\nAssistant: The answer is 4.",
     "rejected": "\n\nHuman: What is two plus two?\n\nAssistant: I don't know."},
    {"chosen": "\n\nHuman: Write a short review of the movie.\n\nAssistant: Which movie?\n\nHuman: "
               "Any movie.\n\nAssistant: The movie was wonderful and the acting was great.",
     "rejected": "\n\nHuman: Write a short review of the movie.\n\nAssistant: Which movie?\n\nHuman: "
                 "Any movie.\n\nAssistant: The film was terrible, boring and far too long."},
    {"chosen": "\n\nHuman: Name a happy word.\n\nAssistant: happy",
     "rejected": "\n\nHuman: Name a happy word.\n\nAssistant: sad"},
    {"chosen": "\n\nHuman: Please answer briefly.\n\nAssistant: Yes, happy to help.",
     "rejected": "\n\nHuman: Please answer briefly.\n\nAssistant: Yes, but no."},
    {"chosen": "\n\nHuman: Tell me about the fox.\n\nAssistant: The quick brown fox jumps over the lazy dog.",
     "rejected": "\n\nHuman: Tell me about the fox.\n\nAssistant: The quick brown fox is sad."},
]


def train(algorithm: str, model, data, out, *extra: str):
    return run_cli("train", algorithm, "--model", model, "--data", data, "--output", out,
                   "--max-steps", "1", "--batch-size", "2", "--no-progress", *extra)


def tokenized(algorithm: str, model_dir, data, **fields):
    """The examples the trainer of `algorithm` builds from `data`, and the tokenizer."""
    config = TrainConfig(algorithm=algorithm, model=str(model_dir), data=str(data), **fields)
    task = make_task(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = task.tokenize(load_table(config.data, task, config, "training"), tokenizer)
    return examples, tokenizer


def prompt_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("algorithm", ["dpo", "ipo", "simpo", "orpo", "rm"])
def test_ultrafeedback_binarized_trains_pairwise_without_edits(tiny_model_dir, tmp_path, algorithm):
    """UltraFeedback-binarized as published (prompt + chosen/rejected repeating the user turn) -> dpo, the pairwise family and rm train; the prompt is the shared turn, rendered once"""
    data = write_jsonl(tmp_path / "ultrafeedback.jsonl", ultrafeedback_rows())
    run = train(algorithm, tiny_model_dir, data, tmp_path / "run")
    assert run.code == 0, run.err
    examples, tokenizer = tokenized(algorithm, tiny_model_dir, data)
    for example, (prompt, good, bad, _, _) in zip(examples, ULTRAFEEDBACK_TURNS, strict=True):
        shown = tokenizer.decode(example.prompt_ids)
        assert shown.endswith(prompt_text(tokenizer, [message("user", prompt)]))
        assert tokenizer.decode(example.chosen_ids) == good + tokenizer.eos_token
        assert tokenizer.decode(example.rejected_ids) == bad + tokenizer.eos_token
        assert (shown + tokenizer.decode(example.chosen_ids)).count(prompt) == 1


def test_ultrafeedback_binarized_sft_trains_on_messages(tiny_model_dir, tmp_path):
    """sft on UltraFeedback-binarized as published -> trains on `messages`: the user turn is the prompt, the assistant turn the completion"""
    data = write_jsonl(tmp_path / "ultrafeedback.jsonl", ultrafeedback_rows())
    run = train("sft", tiny_model_dir, data, tmp_path / "run")
    assert run.code == 0, run.err
    examples, tokenizer = tokenized("sft", tiny_model_dir, data)
    for example, (prompt, good, _, _, _) in zip(examples, ULTRAFEEDBACK_TURNS, strict=True):
        assert tokenizer.decode(example.prompt_ids).endswith(prompt_text(tokenizer, [message("user", prompt)]))
        assert tokenizer.decode(example.completion_ids) == good + tokenizer.eos_token


def test_ultrafeedback_hub_snapshot_trains_on_the_named_split(tiny_model_dir, tmp_path):
    """--data on an UltraFeedback hub snapshot (data/train_prefs-00000-of-00001.parquet, test_prefs, train_sft) --split train_prefs -> trains on that split"""
    folder = tmp_path / "ultrafeedback_binarized"
    (folder / "data").mkdir(parents=True)
    rows = ultrafeedback_rows()
    for name, part in (("train_prefs", rows[:4]), ("test_prefs", rows[4:]), ("train_sft", rows[:2])):
        datasets.Dataset.from_list(part).to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    run = train("dpo", tiny_model_dir, folder, tmp_path / "run", "--split", "train_prefs")
    assert run.code == 0, run.err
    examples, _ = tokenized("dpo", tiny_model_dir, folder, split="train_prefs")
    assert len(examples) == 4
    assert_one_line_error(train("dpo", tiny_model_dir, folder, tmp_path / "run2"), "train",
                          "test_prefs, train_prefs, train_sft", "--split")


@pytest.mark.parametrize("data_format", ["auto", "hh"])
def test_hh_rlhf_transcripts_split_into_prompt_and_final_turns(tiny_model_dir, tmp_path, data_format):
    """Anthropic HH-RLHF as published (chosen/rejected transcripts, no prompt), detected or --data-format hh -> prompt = the shared turns as messages, chosen/rejected = the final assistant turns"""
    data = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    run = train("dpo", tiny_model_dir, data, tmp_path / "run", "--data-format", data_format)
    assert run.code == 0, run.err
    examples, tokenizer = tokenized("dpo", tiny_model_dir, data, data_format=data_format)
    second = examples[1]
    turns = [message("user", "Write a short review of the movie."), message("assistant", "Which movie?"),
             message("user", "Any movie.")]
    assert tokenizer.decode(second.prompt_ids).endswith(prompt_text(tokenizer, turns))
    assert tokenizer.decode(second.chosen_ids) == "The movie was wonderful and the acting was great." + tokenizer.eos_token
    assert tokenizer.decode(second.rejected_ids) == "The film was terrible, boring and far too long." + tokenizer.eos_token
    assert "Human:" not in tokenizer.decode(second.prompt_ids) + tokenizer.decode(second.chosen_ids)


def test_hh_rlhf_reward_model_trains(tiny_model_dir, tmp_path):
    """rm on Anthropic HH-RLHF as published -> trains, each pair scored on the shared conversation plus its final turn"""
    data = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    run = train("rm", tiny_model_dir, data, tmp_path / "run")
    assert run.code == 0, run.err
    examples, tokenizer = tokenized("rm", tiny_model_dir, data)
    assert tokenizer.decode(examples[0].chosen_ids) == "The answer is 4." + tokenizer.eos_token


def test_data_format_hh_on_rows_that_are_not_transcripts_names_the_row(tiny_model_dir, tmp_path):
    """--data-format hh on plain prompt/chosen/rejected rows -> one-line error naming the file and row 1"""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(4))
    assert_one_line_error(train("dpo", tiny_model_dir, data, tmp_path / "run", "--data-format", "hh"),
                          "train", "pairs.jsonl", "row 1", "HH-RLHF")


def test_hh_rlhf_hub_snapshot_trains_on_its_train_files(tiny_model_dir, tmp_path, caplog):
    """--data on an HH-RLHF hub snapshot (harmless-base/train.jsonl.gz, test.jsonl.gz, helpful-base/...) -> reads every train.jsonl.gz, splits the transcripts and trains"""
    folder = tmp_path / "hh-rlhf"
    for subset, rows in (("harmless-base", HH_ROWS[:3]), ("helpful-base", HH_ROWS[3:])):
        (folder / subset).mkdir(parents=True)
        for split, part in (("train", rows), ("test", rows[:1])):
            text = "".join(json.dumps(row) + "\n" for row in part)
            (folder / subset / f"{split}.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    with caplog.at_level(logging.INFO, logger="alignkit"):
        run = train("dpo", tiny_model_dir, folder, tmp_path / "run")
    assert run.code == 0, run.err
    assert "harmless-base/train.jsonl.gz, helpful-base/train.jsonl.gz" in caplog.text
    examples, tokenizer = tokenized("dpo", tiny_model_dir, folder)
    assert len(examples) == len(HH_ROWS)
    assert tokenizer.decode(examples[0].chosen_ids) == "The answer is 4." + tokenizer.eos_token
