"""Rendering, shared-prompt tokenisation, truncation and collation."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from alignkit.data import (
    DataError,
    RowTable,
    collate_pairs,
    collate_sequences,
    pad_left,
    render_prompt_and_responses,
    tokenize_pairwise,
    tokenize_prompts,
    tokenize_ranked,
    tokenize_sft,
)
from alignkit.testing import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def bos_tokenizer(tokenizer):
    """Like `tokenizer`, but it prepends bos when adding special tokens (as Llama's does)."""
    copied = copy.deepcopy(tokenizer)
    copied._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", copied.bos_token_id)]
    )
    return copied


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_standard_pair_shares_the_prompt_and_ends_responses_with_eos(tokenizer):
    rows = [
        {
            "prompt": "The movie was",
            "chosen": " wonderful and great.",
            "rejected": " terrible, boring",
            "margin": 0.5,
        }
    ]
    examples, stats = tokenize_pairwise(RowTable(rows), tokenizer, max_length=64)
    (example,) = examples
    eos = tokenizer.eos_token_id
    assert example.prompt_ids == encode(tokenizer, "The movie was")
    # Each response is tokenised on its own: no BPE merge crosses the prompt/response seam.
    assert example.chosen_ids == encode(tokenizer, " wonderful and great.") + [eos]
    assert example.rejected_ids == encode(tokenizer, " terrible, boring") + [eos]
    assert example.row == 0 and example.extras == {"margin": 0.5}
    assert (stats.examples, stats.truncated_prompts, stats.truncated_responses) == (1, 0, 0)


def test_response_already_ending_in_eos_gets_no_second_eos(tokenizer):
    text, responses = render_prompt_and_responses(
        {"prompt": "p", "completion": "done<|im_end|>"}, tokenizer, ["completion"]
    )
    assert (text, responses) == ("p", ["done<|im_end|>"])


def test_conversational_rendering_matches_the_chat_template(tokenizer):
    prompt = [user("Write a short review of the movie.")]
    row = {
        "prompt": prompt,
        "chosen": [assistant("I loved the story.")],
        "rejected": [assistant("I hated every minute.")],
    }
    prompt_text, (chosen_text, rejected_text) = render_prompt_and_responses(
        row, tokenizer, ["chosen", "rejected"]
    )
    assert prompt_text == tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(prompt + row["chosen"], tokenize=False)
    assert full == prompt_text + chosen_text + "\n"  # the template's newline after eos is cut
    assert chosen_text == "I loved the story.<|im_end|>"
    assert rejected_text == "I hated every minute.<|im_end|>"
    (example,), _ = tokenize_pairwise(RowTable([row]), tokenizer, max_length=128)
    assert example.prompt_ids == encode(tokenizer, prompt_text)
    assert example.chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.prompt_ids + example.chosen_ids) == full.rstrip("\n")


def test_implicit_prompt_pairs_render_like_explicit_ones(tokenizer):
    implicit = {
        "chosen": [user("hi"), assistant("hello")],
        "rejected": [user("hi"), assistant("go away")],
    }
    explicit = {
        "prompt": [user("hi")],
        "chosen": [assistant("hello")],
        "rejected": [assistant("go away")],
    }
    keys = ["chosen", "rejected"]
    assert render_prompt_and_responses(implicit, tokenizer, keys) == render_prompt_and_responses(
        explicit, tokenizer, keys
    )


def test_messages_rows_use_the_last_assistant_turn_as_completion(tokenizer):
    messages = [user("hi"), assistant("hello"), user("Two plus two?"), assistant("4")]
    prompt_text, (completion,) = render_prompt_and_responses(
        {"messages": messages}, tokenizer, ["completion"]
    )
    assert prompt_text == tokenizer.apply_chat_template(
        messages[:3], add_generation_prompt=True, tokenize=False
    )
    assert completion == "4<|im_end|>"


def test_chat_flag_wraps_string_prompts(tokenizer):
    row = {"prompt": "Say hi", "completion": "hi"}
    plain = render_prompt_and_responses(row, tokenizer, ["completion"])
    assert plain == ("Say hi", ["hi<|im_end|>"])
    wrapped = render_prompt_and_responses(row, tokenizer, ["completion"], apply_chat_template=True)
    assert wrapped == (
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n",
        ["hi<|im_end|>"],
    )
    (example,), _ = tokenize_sft(RowTable([row]), tokenizer, max_length=64, chat=True)
    assert example.prompt_ids == encode(tokenizer, wrapped[0])


def test_template_that_does_not_prefix_the_prompt_is_a_clear_row_error(tokenizer):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<think>{% endif %}"
    )
    table = RowTable(
        [{"prompt": [user("hi")], "completion": [assistant("yo")]}], [("chat.jsonl", 3)]
    )
    with pytest.raises(DataError, match=r"chat\.jsonl, row 3: .*does not render the prompt"):
        tokenize_sft(table, odd, max_length=64)


def test_conversational_rows_need_a_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    table = RowTable([{"prompt": [user("hi")], "completion": "yo"}])
    with pytest.raises(DataError, match="chat template"):
        tokenize_sft(table, plain, max_length=64)


def test_bos_is_added_once_when_the_tokenizer_adds_special_tokens(tokenizer, bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    table = RowTable([{"prompt": "Say hi", "completion": "hi"}])
    (example,), _ = tokenize_sft(table, bos_tokenizer, max_length=64)
    assert example.prompt_ids == [bos] + encode(bos_tokenizer, "Say hi")
    assert bos not in example.completion_ids
    (plain,), _ = tokenize_sft(table, tokenizer, max_length=64)
    assert plain.prompt_ids == encode(tokenizer, "Say hi")
    # A chat template that writes bos itself must not get a second one.
    bos_tokenizer.chat_template = "<|endoftext|>" + bos_tokenizer.chat_template
    (chat,), _ = tokenize_sft(table, bos_tokenizer, max_length=64, chat=True)
    assert chat.prompt_ids[:2] != [bos, bos] and chat.prompt_ids[0] == bos


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    prompt = "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"
    chosen = " the quick brown fox jumps over the lazy dog"
    rows = [
        {"prompt": prompt, "chosen": chosen, "rejected": " no"},
        {"prompt": "Hi", "chosen": " yes", "rejected": " no"},
    ]
    prompt_ids = encode(tokenizer, prompt)
    chosen_ids = encode(tokenizer, chosen) + [tokenizer.eos_token_id]
    examples, stats = tokenize_pairwise(
        RowTable(rows), tokenizer, max_length=12, max_prompt_length=8
    )
    long, short = examples
    assert long.prompt_ids == prompt_ids[-8:]
    assert long.chosen_ids == chosen_ids[:4]
    assert long.rejected_ids == encode(tokenizer, " no") + [tokenizer.eos_token_id]
    assert short.prompt_ids == encode(tokenizer, "Hi")
    assert (stats.examples, stats.truncated_prompts, stats.truncated_responses) == (2, 1, 1)
    assert "2 examples: 1 prompts truncated" in stats.summary()


def test_prompt_is_cut_further_to_leave_one_response_token(tokenizer):
    prompt = "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"
    table = RowTable([{"prompt": prompt, "completion": " yes"}])
    (example,), stats = tokenize_sft(table, tokenizer, max_length=6)
    assert example.prompt_ids == encode(tokenizer, prompt)[-5:]
    assert example.completion_ids == encode(tokenizer, " yes")[:1]
    assert (stats.truncated_prompts, stats.truncated_responses) == (1, 1)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_sft(table, tokenizer, max_length=1)


def test_tokenize_prompts_and_ranked(tokenizer):
    table = RowTable([{"prompt": "Write a short review of the movie."}, {"prompt": [user("hi")]}])
    prompts, stats = tokenize_prompts(table, tokenizer, max_prompt_length=4)
    assert prompts[0] == encode(tokenizer, "Write a short review of the movie.")[-4:]
    assert (
        prompts[1]
        == encode(tokenizer, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")[-4:]
    )
    assert (stats.examples, stats.truncated_prompts) == (2, 2)
    ranked = RowTable(
        [{"prompt": "p", "completions": ["good", "bad", "awful"], "scores": [2, 1, 0]}]
    )
    (example,), _ = tokenize_ranked(ranked, tokenizer, max_length=32)
    eos = tokenizer.eos_token_id
    assert example.response_ids == [encode(tokenizer, w) + [eos] for w in ("good", "bad", "awful")]
    assert example.scores == [2.0, 1.0, 0.0] and example.prompt_ids == encode(tokenizer, "p")


def test_collate_pairs_aligns_chosen_and_rejected_rows(tokenizer):
    rows = [
        {
            "prompt": "The movie was",
            "chosen": " great",
            "rejected": " awful and boring",
            "margin": 1.0,
        },
        {"prompt": "Two plus two?", "chosen": " 4", "rejected": " 5", "margin": 2.0},
    ]
    examples, _ = tokenize_pairwise(RowTable(rows), tokenizer, max_length=64)
    pad = tokenizer.pad_token_id
    batch = collate_pairs(examples, pad)
    B = len(examples)
    T = max(ex.length for ex in examples)
    assert batch["input_ids"].shape == (2 * B, T) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long
    assert batch["response_mask"].dtype == torch.bool
    torch.testing.assert_close(batch["margin"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(batch["rows"], torch.tensor([0, 1]))
    for b, ex in enumerate(examples):
        for n, response in ((b, ex.chosen_ids), (b + B, ex.rejected_ids)):
            P, L = len(ex.prompt_ids), len(ex.prompt_ids) + len(response)
            assert batch["prompt_lengths"][n] == P
            assert batch["input_ids"][n, :P].tolist() == ex.prompt_ids
            assert batch["input_ids"][n, P:L].tolist() == response
            assert batch["input_ids"][n, L:].eq(pad).all()
            assert batch["attention_mask"][n].tolist() == [1] * L + [0] * (T - L)
            assert batch["response_mask"][n].nonzero().flatten().tolist() == list(range(P, L))
    response_lengths = [len(ex.chosen_ids) for ex in examples] + [
        len(ex.rejected_ids) for ex in examples
    ]
    assert batch["response_mask"].sum(1).tolist() == response_lengths
    assert collate_pairs(examples, pad, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0


def test_collate_sequences_and_pad_left(tokenizer):
    rows = [
        {"prompt": "Say hi", "completion": " hi", "label": True},
        {"prompt": "Review", "completion": " awful picture", "label": False},
    ]
    examples, _ = tokenize_sft(RowTable(rows), tokenizer, max_length=64)
    batch = collate_sequences(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, max(ex.length for ex in examples))
    assert batch["response_mask"].sum(1).tolist() == [len(ex.completion_ids) for ex in examples]
    assert batch["prompt_lengths"].tolist() == [len(ex.prompt_ids) for ex in examples]
    torch.testing.assert_close(batch["label"], torch.tensor([1.0, 0.0]))
    input_ids, attention_mask = pad_left([[5, 6, 7], [8]], pad_id=3)
    assert input_ids.tolist() == [[5, 6, 7], [3, 3, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
