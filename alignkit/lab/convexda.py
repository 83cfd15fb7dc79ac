"""`alignkit augment-pairs --method convexda`: ConvexDA, the training-time remedy for reward
inconsistency of Shen et al. 2023 ("The Trickle-down Impact of Reward (In-)consistency on
RLHF", arXiv 2309.16155).

    alignkit augment-pairs --data pairs.jsonl --method convexda --out augmented.jsonl
    alignkit train rm --data augmented.jsonl ...

Procedure (ALGORITHMS-addendum.md §5, checked against the official script
shadowkiller33/Contrast-Instruction `code/DA_convex.py`), for every (prompt, chosen, rejected):
1. make `copies` (5) perturbed copies of the PREFERRED response with a word-level perturbation;
2. embed the copies with a sentence encoder, project them to 2-D with PCA, take the convex hull;
3. keep `per_pair` (1) hull vertices, drawn at random (seeded), and add
   (prompt, perturbed chosen, original rejected) to the training pairs.
The output holds the original pairs (unless --no-originals) followed by the new ones, marked
`augmented: "convexda"` and `source_row` (the 1-based row they came from); the RM then trains
with the ordinary Bradley-Terry loss. `OUT_STEM.manifest.json` records settings and counts.

Deviations, on purpose:
- Encoder: the packaged all-MiniLM-L6-v2 (mean-pooled, unit-norm) instead of SimCSE
  RoBERTa-base (pooler output), which is not shipped.
- Perturbation: the script uses nlpaug's `SpellingAug` (a dictionary of real misspellings,
  at most int(0.05 x words) words); nlpaug and its dictionary are not available offline, and
  reviewers describe WordNet synonyms, which are not available either. The default here,
  `spelling_noise`, gives max(1, floor(5% of the words)) words one typo each (swap, drop, double
  or keyboard-neighbour letter), seeded; at least one word (`--min-words 1`), because
  int(0.05 x words) is 0 for responses under 20 words and the script then makes no change
  (`--min-words 0` restores that cap: such pairs get no new pair, their copies counted as
  unchanged). `--perturb file.py:function`
  plugs in any `(text, rng: random.Random) -> str`.
- Hull vertices: the script loops over every vertex but appends one reused dict, so it keeps
  copies of the last vertex (in effect one per pair); `per_pair` makes the count explicit.
  Copies identical to each other count once, and copies identical to the original response are
  never kept (they would duplicate the pair); both are counted in the manifest.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.data import load_rows, split_implicit_prompt
from alignkit.lab.convex_hull import convex_hull_indices, pca_2d
from alignkit.rewards.rules import completion_text

Perturbation = Callable[[str, random.Random], str]

KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
KEYBOARD_NEIGHBOURS = {
    letter: "".join(row[j] for j in (i - 1, i + 1) if 0 <= j < len(row))
    for row in KEYBOARD_ROWS for i, letter in enumerate(row)
}


def typo(word: str, rng: random.Random) -> str:
    """One spelling error in `word` (>= 2 letters): swap two neighbouring letters, drop one,
    double one or replace one with a keyboard neighbour; the result differs from `word`."""
    for _ in range(8):
        i = rng.randrange(len(word))
        kind = rng.choice(("swap", "drop", "double", "neighbour"))
        if kind == "swap" and i + 1 < len(word) and word[i] != word[i + 1]:
            result = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif kind == "drop":
            result = word[:i] + word[i + 1:]
        elif kind == "double":
            result = word[:i] + word[i] + word[i:]
        elif kind == "neighbour" and word[i].lower() in KEYBOARD_NEIGHBOURS:
            replacement = rng.choice(KEYBOARD_NEIGHBOURS[word[i].lower()])
            result = word[:i] + (replacement.upper() if word[i].isupper() else replacement) + word[i + 1:]
        else:
            continue
        if result != word:
            return result
    return word[:-1]  # dropping the last letter always changes a word of >= 2 letters


def spelling_noise(text: str, rng: random.Random, rate: float = 0.05, min_words: int = 1) -> str:
    """`text` with max(min_words, floor(rate x words)) of its alphabetic words (>= 2 letters,
    chosen with `rng`) given one typo each; whitespace and punctuation are kept. A text with no
    such word is returned unchanged; `min_words=0` is the official script's cap exactly."""
    pieces = re.split(r"(\s+)", text)  # words and the whitespace between them, kept as it was
    words = [i for i, piece in enumerate(pieces) if sum(c.isalpha() for c in piece) >= 2]
    if not words:
        return text
    count = min(len(words), max(min_words, int(rate * len([p for p in pieces if p.strip()]))))
    for i in rng.sample(words, count):
        piece = pieces[i]
        letters = [j for j, c in enumerate(piece) if c.isalpha()]
        start, end = letters[0], letters[-1] + 1  # the typo stays inside the word, not its punctuation
        pieces[i] = piece[:start] + typo(piece[start:end], rng) + piece[end:]
    return "".join(pieces)


def _with_text(response: Any, text: str) -> Any:
    """`response` with its text replaced: a string, or the last message of a message list."""
    if isinstance(response, list):
        return [*response[:-1], {**response[-1], "content": text}]
    return text


def hull_choices(embeddings: Any, per_pair: int, rng: random.Random) -> list[int]:
    """`per_pair` random hull vertices (fewer when the hull has fewer) of the 2-D PCA of
    `embeddings` (N, D), in row order (PCA's column signs can reverse the hull's direction,
    so hull order is not a stable output order)."""
    vertices = sorted(convex_hull_indices(pca_2d(embeddings)))
    return sorted(rng.sample(vertices, min(per_pair, len(vertices))))


def convexda_pairs(
    rows: Sequence[dict[str, Any]],
    *,
    embedder: Any,
    copies: int = 5,
    per_pair: int = 1,
    perturb: Perturbation = spelling_noise,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The ConvexDA pairs of `rows` (pairwise rows; see the module docstring) and the counts
    `pairs`, `augmented`, `unchanged_copies` (copies equal to the original), `duplicate_copies`.
    Row i's draws use `random.Random(f"{seed}:{i}")`, so a row's augmentation does not depend on
    the rows before it."""
    augmented, counts = [], {"pairs": len(rows), "augmented": 0, "unchanged_copies": 0, "duplicate_copies": 0}
    for number, row in enumerate(rows, start=1):
        rng = random.Random(f"{seed}:{number}")
        original = completion_text(row["chosen"])
        texts = [perturb(original, rng) for _ in range(copies)]
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"--perturb returned a {type(text).__name__}, not a string")
        distinct = list(dict.fromkeys(t for t in texts if t != original))
        counts["unchanged_copies"] += sum(t == original for t in texts)
        counts["duplicate_copies"] += sum(t != original for t in texts) - len(distinct)
        if not distinct:
            continue
        chosen = hull_choices(embedder.encode(distinct), per_pair, rng)
        for index in chosen:
            augmented.append({"prompt": row["prompt"], "chosen": _with_text(row["chosen"], distinct[index]),
                              "rejected": row["rejected"], "augmented": "convexda", "source_row": number})
    counts["augmented"] = len(augmented)
    return augmented, counts


@dataclass
class AugmentOptions:
    """`alignkit augment-pairs` options."""

    data: str
    """Pairwise dataset (prompt, chosen, rejected; text or conversational)."""
    out: str
    """The augmented pairs (JSONL); the manifest goes beside it as OUT_STEM.manifest.json."""
    method: Literal["convexda"] = "convexda"
    """Augmentation: convexda (Shen et al. 2023: perturbed chosen responses on the convex hull of their 2-D PCA)."""
    copies: int = 5
    """Perturbed copies of each chosen response (>= 1)."""
    per_pair: int = 1
    """Hull vertices kept per pair (>= 1), drawn at random."""
    noise_rate: float = 0.05
    """Share of words the default spelling noise changes (floor of it)."""
    min_words: int = 1
    """Fewest words the default spelling noise changes (0: the official cap, no change under 20 words)."""
    perturb: str | None = None
    """A perturbation `file.py:function` or `module:function`, called as f(text, rng) -> text; replaces spelling noise."""
    seed: int = 0
    """Seed of the perturbations and of the vertex draws."""
    no_originals: bool = False
    """Write only the augmented pairs."""


def check_options(options: AugmentOptions) -> None:
    """One-line errors naming the flag, before anything loads."""
    for flag, value in (("--copies", options.copies), ("--per-pair", options.per_pair)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0 < options.noise_rate <= 1:
        raise ValueError(f"--noise-rate is a share of words in (0, 1], got {options.noise_rate}")
    if options.min_words < 0:
        raise ValueError(f"--min-words must be >= 0, got {options.min_words}")
    if options.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {options.seed}")
    if Path(options.out).suffix != ".jsonl":
        raise ValueError(f"--out {options.out}: write the pairs to a .jsonl file")


def load_pairs(source: str) -> list[dict[str, Any]]:
    """Pairwise rows of `source`; a row without a non-empty prompt, chosen or rejected is an
    error naming the file and row."""
    table = load_rows(source)
    rows = []
    for i, row in enumerate(table.rows):
        row = split_implicit_prompt(row)
        for column in ("prompt", "chosen", "rejected"):
            if not row.get(column):
                raise table.error(i, f"--data needs pairwise rows: column {column!r} is missing or empty")
        rows.append(row)
    return rows


def run_augment(options: AugmentOptions, embedder: Any = None) -> dict[str, Any]:
    """Read, augment, write (see the module docstring); returns the manifest."""
    check_options(options)
    if options.perturb is not None:
        from alignkit.rewards.loading import load_object

        perturb = load_object(options.perturb, what="--perturb")
        if not callable(perturb):
            raise ValueError(f"--perturb {options.perturb!r} is not a function")
    else:
        rate, min_words = options.noise_rate, options.min_words

        def perturb(text: str, rng: random.Random) -> str:
            return spelling_noise(text, rng, rate, min_words)

    rows = load_pairs(options.data)
    if embedder is None:
        from alignkit.eval.embeddings import MiniLMEmbedder

        embedder = MiniLMEmbedder()
    augmented, counts = convexda_pairs(rows, embedder=embedder, copies=options.copies,
                                       per_pair=options.per_pair, perturb=perturb, seed=options.seed)
    written = augmented if options.no_originals else [*rows, *augmented]
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in written))
    manifest = {"command": "alignkit augment-pairs", "settings": asdict(options),
                "counts": {**counts, "written": len(written)}, "encoder": type(embedder).__name__,
                "pairs_file": str(out)}
    manifest_path = out.with_name(out.stem + ".manifest.json")
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{counts['augmented']} ConvexDA pairs from {counts['pairs']} pairs ({options.copies} copies each, "
          f"{counts['unchanged_copies']} unchanged, {counts['duplicate_copies']} duplicate); "
          f"written: {out} ({len(written)} rows), {manifest_path}")
    return manifest


def main(argv: list[str]) -> int:
    import tyro

    run_augment(tyro.cli(AugmentOptions, args=argv, prog="alignkit augment-pairs",
                         description=__doc__.split("\n\n")[0]))
    return 0


__all__ = ["AugmentOptions", "convexda_pairs", "hull_choices", "run_augment", "spelling_noise", "typo"]
