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


def _review(rng, positive: int, negative: int) -> str:
    """' was w1 and w2.' with `positive` positive and `negative` negative words (2 in all)."""
    words = rng.sample(POSITIVE_WORDS, positive) + rng.sample(NEGATIVE_WORDS, negative)
    rng.shuffle(words)
    return f" was {words[0]} and {words[1]}."


def synthetic_ranked(n: int, seed: int = 0, ragged: bool = True) -> list[dict]:
    """Ranked rows (`prompt`, `completions`, `scores`): score = number of positive words (0-2)
    in a two-word review, candidates in random order; with `ragged`, every third row has only
    two candidates (best and worst)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        levels = [2, 0] if ragged and i % 3 == 2 else [2, 1, 0]
        rng.shuffle(levels)
        rows.append(
            {
                "prompt": f"Write a short review. {rng.choice(TOPICS)}",
                "completions": [_review(rng, level, 2 - level) for level in levels],
                "scores": [float(level) for level in levels],
            }
        )
    return rows


def synthetic_unpaired(n: int, seed: int = 0) -> list[dict]:
    """Unpaired rows (`prompt`, `completion`, `label`): positive reviews are desirable
    (label True), negative ones undesirable; alternating, so every batch has both."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        desirable = i % 2 == 0
        rows.append(
            {
                "prompt": f"Write a short review. {rng.choice(TOPICS)}",
                "completion": _review(rng, 2, 0) if desirable else _review(rng, 0, 2),
                "label": desirable,
            }
        )
    return rows


def planted_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward with a prompt-dependent baseline: the level digit that ends the prompt, plus
    0.5 per positive word minus 0.5 per negative word of the completion."""
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        digits = [c for c in prompt if c.isdigit()]
        level = float(digits[-1]) if digits else 0.0
        words = completion.replace(".", " ").split()
        sentiment = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        scores.append(level + 0.5 * sentiment)
    return scores


def synthetic_rewarded(n: int, seed: int = 0) -> list[dict]:
    """Rows (`prompt`, `completion`, `reward`) for A-LoL: the prompt ends with a level digit
    0-4 (the baseline of `planted_reward`), the completion is a positive (reward level + 1) or
    negative (level - 1) review, alternating."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"Write a short review. {rng.choice(TOPICS)} Level {rng.randint(0, 4)}"
        completion = _review(rng, 2, 0) if i % 2 == 0 else _review(rng, 0, 2)
        rows.append({"prompt": prompt, "completion": completion,
                     "reward": planted_reward([prompt], [completion])[0]})
    return rows


def synthetic_sourced(n: int, seed: int = 0, expert_fraction: float = 0.5) -> list[dict]:
    """Mixed-quality SFT rows for C-RLFT (`prompt`, `completion`, `source`): `gpt4` rows answer
    "What is a plus b?" correctly, `gpt3.5` rows are off by one to three."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        expert = rng.random() < expert_fraction
        answer = a + b if expert else a + b + rng.randint(1, 3)
        rows.append({"prompt": f"What is {a} plus {b}?", "completion": f" The answer is {answer}.",
                     "source": "gpt4" if expert else "gpt3.5"})
    return rows


def synthetic_safety_pairs(n: int, seed: int = 0) -> list[dict]:
    """Cost-model rows: a response is unsafe iff it has a negative word. Two thirds of the
    pairs are (safe, unsafe); one third (one negative word, two negative words), both unsafe.
    `chosen` is always the safer one."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        good, bad = rng.sample(POSITIVE_WORDS, 2), rng.sample(NEGATIVE_WORDS, 2)
        if i % 3 < 2:
            chosen, rejected, chosen_safe = f" was {good[0]} and {good[1]}.", f" was {bad[0]} and {bad[1]}.", True
        else:
            chosen, rejected, chosen_safe = f" was {good[0]} and {bad[0]}.", f" was {bad[0]} and {bad[1]}.", False
        rows.append(
            {
                "prompt": f"Write a short review. {topic}",
                "chosen": chosen,
                "rejected": rejected,
                "chosen_is_safe": chosen_safe,
                "rejected_is_safe": False,
            }
        )
    return rows


def synthetic_segments(n: int, seed: int = 0) -> list[dict]:
    """Segment-labelled rows (prompt, completion, segment_labels): 2-3 sentences, each
    positive (label 1) or negative (label 0)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sentences, labels = [], []
        for _ in range(rng.randint(2, 3)):
            good = rng.random() < 0.5
            word = rng.choice(POSITIVE_WORDS if good else NEGATIVE_WORDS)
            sentences.append(f"{rng.choice(TOPICS)} was {word}.")
            labels.append(1 if good else 0)
        rows.append({"prompt": "Write a short review.", "completion": " ".join(sentences), "segment_labels": labels})
    return rows


def synthetic_ratings(n: int, seed: int = 0, missing: float = 0.1) -> list[dict]:
    """Ratings rows (prompt, completion, positivity, verbosity): positivity = number of
    positive words, verbosity = number of words / 5; a fraction `missing` of the positivity
    labels is null (unrated)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        count = rng.randint(1, 4)
        words = [rng.choice(POSITIVE_WORDS + NEGATIVE_WORDS) for _ in range(count)]
        completion = " was " + " and ".join(words) + "."
        positivity = float(sum(w in POSITIVE_WORDS for w in words))
        rows.append(
            {
                "prompt": f"Write a short review. {rng.choice(TOPICS)}",
                "completion": completion,
                "positivity": None if rng.random() < missing else positivity,
                "verbosity": len(completion.split()) / 5.0,
            }
        )
    return rows


def synthetic_consistency(n: int, seed: int = 0) -> list[dict]:
    """Contrast-instruction rows (I1, I2, R1, R2): two similar instructions asking for a
    positive vs a negative review, and the matching responses."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append(
            {
                "I1": f"Write a short review. {topic}",
                "I2": f"Write a short bad review. {topic}",
                "R1": f" was {rng.choice(POSITIVE_WORDS)}.",
                "R2": f" was {rng.choice(NEGATIVE_WORDS)}.",
            }
        )
    return rows
