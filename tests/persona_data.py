"""Synthetic data for the principle-following (rm_principles) and personalised (rm_vpl) reward
model tests: preferences that flip with the principles, or with the user."""

from __future__ import annotations

import random

from alignkit.testing import NEGATIVE_WORDS, POSITIVE_WORDS, TOPICS

SHORT = "Prefer short answers."
LONG = "Prefer long answers."


def short_and_long(rng: random.Random) -> tuple[str, str]:
    """A one-word answer and a long one, both positive (only the length differs in kind)."""
    words = rng.sample(POSITIVE_WORDS, 4)
    return f" {words[0]}.", f" {words[1]} and {words[2]} and {words[3]} and {words[0]}, it was {words[1]}."


def principle_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose preference is set by the `principles` column: under SHORT the short answer
    is chosen, under LONG the long one (each row draws one of the two)."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        short, long = short_and_long(rng)
        principle = rng.choice([SHORT, LONG])
        chosen, rejected = (short, long) if principle == SHORT else (long, short)
        rows.append({"prompt": f"Describe it. {rng.choice(TOPICS)}", "chosen": chosen, "rejected": rejected,
                     "principles": [principle]})
    return rows


def user_pairs(n: int, seed: int = 0, users: tuple[str, str] = ("A", "B")) -> list[dict]:
    """Two users with conflicting preferences on the same kind of pairs: user A prefers the
    positive review, user B the negative one (rows alternate between the users)."""
    rng, rows = random.Random(seed), []
    for k in range(n):
        good, bad = rng.sample(POSITIVE_WORDS, 2), rng.sample(NEGATIVE_WORDS, 2)
        positive, negative = f" was {good[0]} and {good[1]}.", f" was {bad[0]} and {bad[1]}."
        user = users[k % 2]
        chosen, rejected = (positive, negative) if user == users[0] else (negative, positive)
        rows.append({"prompt": f"Write a short review. {rng.choice(TOPICS)}", "chosen": chosen,
                     "rejected": rejected, "user": user})
    return rows
