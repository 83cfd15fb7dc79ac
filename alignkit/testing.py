"""Tiny local models and tokenizers for tests and benchmarks (nothing fetched from a hub).

`build_tiny_model(path)` trains a small byte-level BPE tokenizer on a built-in corpus, builds a
random Llama-style causal LM around it and saves both with `save_pretrained`, so callers load
them back through the real loading code.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The movie was wonderful and the acting was great.",
    "The film was terrible, boring and far too long.",
    "I loved the story, the music and the characters.",
    "I hated every minute of this awful picture.",
    "Write a short review of the movie.",
    "What is two plus two? The answer is 4.",
    "The quick brown fox jumps over the lazy dog.",
    "Please answer the question briefly and politely.",
    "good bad great awful happy sad yes no maybe alpha beta gamma delta",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 20

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE `PreTrainedTokenizerFast` with eos/pad/bos tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    vocab_size: int = 320,
) -> Path:
    """Save a random tiny `LlamaForCausalLM` and its tokenizer to `path`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


POSITIVE_WORDS = ["good", "great", "happy", "wonderful", "loved"]
NEGATIVE_WORDS = ["bad", "awful", "sad", "terrible", "hated"]
TOPICS = ["The movie", "The film", "The story", "The music", "The acting", "The picture"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs with a learnable rule: the chosen review uses positive words, the
    rejected one negative words, around the same topic."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        good, bad = rng.sample(POSITIVE_WORDS, 2), rng.sample(NEGATIVE_WORDS, 2)
        rows.append(
            {
                "prompt": f"Write a short review. {topic}",
                "chosen": f" was {good[0]} and {good[1]}.",
                "rejected": f" was {bad[0]} and {bad[1]}.",
            }
        )
    return rows


def synthetic_sft(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows where the completion follows a fixed pattern of the prompt."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"What is {a} plus {b}?", "completion": f" The answer is {a + b}."})
    return rows
