"""Lexicographic reward factors (HERON, Bukharin et al. 2023): the comparator by hand (ties,
tolerances, fall-through), pairing, factor parsing, and `alignkit label --lexicographic`."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import write_jsonl

from alignkit.cli import main as cli_main
from alignkit.data import detect_kind, load_rows
from alignkit.lab.label import LabelOptions, run_label
from alignkit.lab.lexicographic import (
    Factor,
    lexicographic_compare,
    lexicographic_pairs,
    parse_factors,
    resolve_tolerances,
)


def test_compare_worked_examples():
    """Tolerances (0.5, 0): a = (1.0, 3) vs b = (1.4, 2): |0.4| <= 0.5 falls through, 3 > 2 on
    factor 2 -> a wins at factor index 1. c = (2.0, 0) beats a on factor 1 (1.0 > 0.5)."""
    tolerances = [0.5, 0.0]
    assert lexicographic_compare([1.0, 3], [1.4, 2], tolerances) == (1, 1)
    assert lexicographic_compare([1.4, 2], [1.0, 3], tolerances) == (-1, 1)
    assert lexicographic_compare([2.0, 0], [1.0, 3], tolerances) == (1, 0)
    assert lexicographic_compare([1.0, 2], [1.25, 2], tolerances) == (0, None)  # tie on every factor
    assert lexicographic_compare([1.0, 2], [1.5, 9], tolerances) == (-1, 1)  # difference = tolerance: falls through
    assert lexicographic_compare([1.0, 2], [1.5, 2], [0.4, 0.0]) == (-1, 0)


def test_pairs_all_and_best_worst():
    """Responses 0..3 with factors (f1, f2), tolerances (0.5, 0):
    0 = (1.0, 3), 1 = (1.4, 2), 2 = (2.0, 0), 3 = (0.0, 5).
    0-1: 0 wins at f2; 0-2: 2 at f1; 0-3: 0 at f1; 1-2: 2 at f1; 1-3: 1 at f1; 2-3: 2 at f1.
    Copeland: 2 -> +3, 0 -> +1, 1 -> -1, 3 -> -3: best_worst = (2, 3)."""
    scores = [[1.0, 3], [1.4, 2], [2.0, 0], [0.0, 5]]
    texts = ["a", "b", "c", "d"]
    assert lexicographic_pairs(scores, texts, [0.5, 0.0]) == [(0, 1, 1), (2, 0, 0), (0, 3, 0), (2, 1, 0),
                                                              (1, 3, 0), (2, 3, 0)]
    assert lexicographic_pairs(scores, texts, [0.5, 0.0], "best_worst") == [(2, 3, 0)]
    assert lexicographic_pairs(scores, ["a", "a", " ", "d"], [0.5, 0.0]) == [(0, 3, 0)]  # repeat, blank ignored
    assert lexicographic_pairs([[1, 1], [1, 1]], ["a", "b"], [0.0, 0.0]) == "ties"
    assert lexicographic_pairs(scores[:2], ["a", ""], [0.5, 0.0]) == "too_few_samples"
    # best_worst when the best and worst tie directly: a non-transitive triangle
    triangle = [[0.0, 2], [0.4, 1], [0.8, 0]]  # tolerance 0.5: 0>1 (f2), 1>2 (f2), 2>0 (f1)
    assert lexicographic_pairs(triangle, ["a", "b", "c"], [0.5, 0.0], "best_worst") == [(0, 1, 1)]
    with pytest.raises(ValueError, match="--pairing must be one of all, best_worst"):
        lexicographic_pairs(scores, texts, [0.5, 0.0], "some")


def test_parse_factors_inline_and_yaml(tmp_path):
    assert parse_factors("regex:a+:0.2, length:50:0,vader:0.5std") == [
        Factor("regex:a+", 0.2), Factor("length:50", 0.0), Factor("vader", 0.5, in_std=True)]
    with pytest.raises(ValueError, match=r"factor 'vader' has no tolerance: write SPEC:TOLERANCE"):
        parse_factors("vader")
    path = tmp_path / "factors.yaml"
    path.write_text("factors:\n  - {reward: 'length:50', tolerance: 2}\n  - {reward: vader, tolerance_std: 0.5}\n")
    assert parse_factors(str(path)) == [Factor("length:50", 2.0), Factor("vader", 0.5, in_std=True)]
    path.write_text("- {reward: vader, tolerance: 1, tolerance_std: 0.5}\n")
    with pytest.raises(ValueError, match="factor 1: give exactly one of tolerance, tolerance_std"):
        parse_factors(str(path))
    path.write_text("- {reward: vader, tolerance: -1}\n")
    with pytest.raises(ValueError, match="factor 1: tolerance must be a number >= 0, got -1"):
        parse_factors(str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_factors(str(tmp_path / "missing.yaml"))


def test_std_tolerances_worked_example():
    """Factor 1 scores {0, 2, 0, 2}: std (ddof 0) = 1, so 0.5std -> 0.5; factor 2 stays 3."""
    scores = torch.tensor([[[0.0, 1], [2, 1]], [[0, 5], [2, 5]]])  # (P=2, n=2, F=2)
    assert resolve_tolerances([Factor("a", 0.5, True), Factor("b", 3.0)], scores) == [0.5, 3.0]


def has_letter_e(prompts, completions, **columns):
    """Factor 1: 1 when the response contains an 'e'."""
    return [float("e" in c) for c in completions]


def length(prompts, completions, **columns):
    """Factor 2: the response's length in characters."""
    return [float(len(c)) for c in completions]


def test_label_lexicographic_pairs_follow_the_factors(tiny_model_dir, tmp_path):
    prompts = ["Tell me", "The movie", "Write a short review.", "What is two plus two?"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "pairs.jsonl"
    factors = f"{__file__}:has_letter_e:0,{__file__}:length:2"
    manifest = run_label(LabelOptions(prompts=data, model=str(tiny_model_dir), out=str(out), n=4, max_new_tokens=8,
                                      lexicographic=factors, no_progress=True))
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == manifest["counts"]["pairs"] > 4  # several decided pairs per prompt
    decided = manifest["lexicographic"]["decided_by"]
    assert sum(decided.values()) == len(pairs) and decided[f"{__file__}:has_letter_e"] > 0
    for pair in pairs:
        e_chosen, e_rejected = ("e" in pair["chosen"]), ("e" in pair["rejected"])
        if e_chosen != e_rejected:
            assert e_chosen and pair["decided_by"].endswith(":has_letter_e")
        else:
            assert len(pair["chosen"]) - len(pair["rejected"]) > 2 and pair["decided_by"].endswith(":length")
        assert pair["factor_scores_chosen"] == [float(e_chosen), float(len(pair["chosen"]))]
    assert detect_kind(load_rows(str(out))) == "pairwise"
    one = run_label(LabelOptions(prompts=data, model=str(tiny_model_dir), out=str(tmp_path / "one.jsonl"), n=4,
                                 max_new_tokens=8, lexicographic=factors, pairing="best_worst", no_progress=True))
    assert one["counts"]["pairs"] + one["counts"]["ties"] + one["counts"]["too_few_samples"] == 4


def test_label_lexicographic_bad_flags_are_one_line(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Tell me"}])
    base = ["label", "--prompts", data, "--model", str(tiny_model_dir), "--out", str(tmp_path / "p.jsonl")]
    assert cli_main([*base, "--reward", "length:4", "--lexicographic", "vader:0"]) == 2
    assert "give --reward SPEC or --lexicographic FACTORS (one of them)" in capsys.readouterr().err
    assert cli_main(base) == 2
    assert "give --reward SPEC or --lexicographic FACTORS" in capsys.readouterr().err
    assert cli_main([*base, "--reward", "length:4", "--pairing", "all"]) == 2
    assert "--pairing chooses among --lexicographic comparisons" in capsys.readouterr().err
    assert cli_main([*base, "--lexicographic", "vader"]) == 2
    assert "factor 'vader' has no tolerance" in capsys.readouterr().err
