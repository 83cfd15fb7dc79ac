"""ConvexDA (Shen et al. 2023): PCA and the monotone-chain hull by hand, the seeded spelling
noise, the documented pairs on a planted set, and `alignkit augment-pairs` end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from run_helpers import write_jsonl

from alignkit.cli import main
from alignkit.data import detect_kind, load_rows
from alignkit.lab.convex_hull import convex_hull_indices, pca_2d
from alignkit.lab.convexda import convexda_pairs, hull_choices, spelling_noise, typo
from alignkit.testing import synthetic_pairs


def test_pca_2d_worked_example():
    """(+-2, 0, 0), (0, +-1, 0): x holds variance 8/3, y 2/3 -> (+-2, 0), (0, +-1) up to signs."""
    points = torch.tensor([[2.0, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0]]) + torch.tensor([5.0, 5, 5])
    projected = pca_2d(points)
    torch.testing.assert_close(projected.abs(), torch.tensor([[2.0, 0], [2, 0], [0, 1], [0, 1]], dtype=torch.float64))
    assert pca_2d(torch.ones(3, 4)).abs().max() < 1e-12  # no variance: all at the origin
    assert pca_2d(torch.tensor([[0.0, 0], [1, 1]])).shape == (2, 2)


def test_convex_hull_worked_examples():
    square = torch.tensor([[0.0, 0], [2, 0], [2, 2], [0, 2], [1, 1], [1, 0]])
    assert convex_hull_indices(square) == [0, 1, 2, 3]  # interior and edge points are not vertices
    shuffled = torch.tensor([[1.0, 1], [2, 2], [0, 2], [0, 0], [2, 0]])
    assert convex_hull_indices(shuffled) == [3, 4, 1, 2]  # counter-clockwise from the lowest (x, y)
    assert convex_hull_indices(torch.tensor([[0.0, 0], [1, 1], [2, 2], [3, 3]])) == [0, 3]  # collinear
    assert convex_hull_indices(torch.tensor([[1.0, 1], [1, 1], [0, 0]])) == [2, 0]  # repeats count once
    assert convex_hull_indices(torch.tensor([[4.0, 4]])) == [0]
    nearly_straight = torch.tensor([[0.0, 0], [1, 1e-13], [2, 0], [1, 1]])
    assert convex_hull_indices(nearly_straight) == [0, 2, 3]
    with pytest.raises(ValueError, match=r"needs \(N, 2\) points"):
        convex_hull_indices(torch.zeros(3, 3))


def test_spelling_noise_changes_five_percent_of_words_seeded():
    words = [f"word{i}x" if i % 2 else "planet" for i in range(40)]
    text = " ".join(words) + "."
    noisy = spelling_noise(text, random.Random(1))
    assert noisy == spelling_noise(text, random.Random(1)) != text
    changed = [a for a, b in zip(text.split(" "), noisy.split(" "), strict=True) if a != b]
    assert len(changed) == 2  # floor(0.05 * 40)
    short = spelling_noise("The movie was good.", random.Random(0))
    assert sum(a != b for a, b in zip("The movie was good.".split(" "), short.split(" "), strict=True)) == 1
    assert short.endswith(".")  # punctuation kept
    assert spelling_noise("1 2 3 !", random.Random(0)) == "1 2 3 !"  # no word to change
    multiline = spelling_noise("(Hello),\n  world!", random.Random(2), rate=1.0)
    assert multiline.startswith("(") and "),\n  " in multiline and multiline.endswith("!")
    assert spelling_noise("The movie was good.", random.Random(0), min_words=0) == "The movie was good."  # 5% of 4
    for seed in range(50):
        assert typo("ab", random.Random(seed)) != "ab"


class PointEmbedder:
    """Embeds "copy-i" at a planted 3-D point."""

    points = {"copy-0": [0.0, 0, 1], "copy-1": [4, 0, 1], "copy-2": [4, 4, 1], "copy-3": [0, 4, 1],
              "copy-4": [2, 2, 1]}

    def encode(self, texts):
        return torch.tensor([self.points[t] for t in texts])


def planted_perturbation():
    """Copies: copy-0 .. copy-4, then the original itself, then copy-4 again."""
    outputs = iter(["copy-0", "copy-1", "copy-2", "copy-3", "copy-4", "good", "copy-4"])
    return lambda text, rng: next(outputs)


def test_convexda_keeps_hull_vertices_of_the_planted_copies():
    """The copies lie on a square's corners (0..3) and centre (4): the hull is the corners, so
    per_pair=4 keeps copy-0..3 (in copy order) and per_pair=1 one corner; the copy equal to the
    original and the repeated copy-4 are counted, never kept."""
    row = {"prompt": "Review:", "chosen": "good", "rejected": "bad"}
    pairs, counts = convexda_pairs([row], embedder=PointEmbedder(), copies=7, per_pair=4,
                                   perturb=planted_perturbation())
    assert [p["chosen"] for p in pairs] == ["copy-0", "copy-1", "copy-2", "copy-3"]
    assert all(p["rejected"] == "bad" and p["prompt"] == "Review:" and p["source_row"] == 1 for p in pairs)
    assert counts == {"pairs": 1, "augmented": 4, "unchanged_copies": 1, "duplicate_copies": 1}
    one, _ = convexda_pairs([row], embedder=PointEmbedder(), copies=7, perturb=planted_perturbation(), seed=3)
    again, _ = convexda_pairs([row], embedder=PointEmbedder(), copies=7, perturb=planted_perturbation(), seed=3)
    assert one == again and len(one) == 1 and one[0]["chosen"] in {"copy-0", "copy-1", "copy-2", "copy-3"}
    conversational = {"prompt": [{"role": "user", "content": "Review:"}],
                      "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}
    pairs, _ = convexda_pairs([conversational], embedder=PointEmbedder(), copies=5, per_pair=1,
                              perturb=lambda text, rng: "copy-4")
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "copy-4"}]  # one copy is its own hull
    assert hull_choices(torch.tensor(list(PointEmbedder.points.values())), 9, random.Random(0)) == [0, 1, 2, 3]


def test_augment_pairs_verb_writes_originals_and_convexda_pairs(tmp_path, capsys):
    rows = synthetic_pairs(6, seed=3)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "aug" / "augmented.jsonl"
    args = ["augment-pairs", "--data", data, "--method", "convexda", "--out", str(out), "--seed", "4"]
    assert main(args) == 0
    assert "6 ConvexDA pairs from 6 pairs (5 copies each" in capsys.readouterr().out
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[:6] == rows and len(written) == 12
    for row in written[6:]:
        source = rows[row["source_row"] - 1]
        assert row["augmented"] == "convexda" and row["rejected"] == source["rejected"]
        before, after = source["chosen"].split(" "), row["chosen"].split(" ")
        assert len(before) == len(after) and sum(a != b for a, b in zip(before, after, strict=True)) == 1
    assert detect_kind(load_rows(str(out))) == "pairwise"
    manifest = json.loads((out.parent / "augmented.manifest.json").read_text())
    assert manifest["counts"]["augmented"] == 6 and manifest["encoder"] == "MiniLMEmbedder"
    first = out.read_text()
    assert main(args) == 0 and out.read_text() == first  # seeded: the same file again


def test_augment_pairs_bad_input_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "p", "chosen": "a"}])
    base = ["augment-pairs", "--data", data]
    assert main([*base, "--out", str(tmp_path / "a.jsonl"), "--per-pair", "0"]) == 2
    assert "--per-pair must be >= 1, got 0" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a.json")]) == 2
    assert "write the pairs to a .jsonl file" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "pairs.jsonl, row 2: --data needs pairwise rows: column 'rejected' is missing" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a.jsonl"), "--perturb", "nowhere.py:f"]) == 2
    assert "--perturb 'nowhere.py:f'" in capsys.readouterr().err
