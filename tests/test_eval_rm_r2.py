"""`alignkit eval-rm --r2` end to end on a tiny locally built reward model: every row is scored,
and each PF-PPO filter's R², r, kept count, slope and intercept match a plain numpy fit over
the rows that filter keeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from run_helpers import write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.cli import main
from alignkit.rewards.saved import load_reward_model

PROMPTS = ["Write a short review. The movie", "Write a short review. The film", "The story"]
WORDS = ["good", "bad", "great", "awful", "happy", "sad"]


@pytest.fixture
def tiny_rm(tiny_model_dir, tmp_path):
    """The tiny Llama with a (random, saved) one-output score head: a sequence-classifier RM."""
    folder = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def samples() -> list[dict]:
    """4 completions of each of 3 prompts, and one prompt with a single completion."""
    rows = [{"prompt": p, "completion": f" was {WORDS[(i + k) % 6]} and {WORDS[(2 * i + k) % 6]}."}
            for i, p in enumerate(PROMPTS) for k in range(4)]
    return rows + [{"prompt": "Tell me about the film.", "completion": " It was fine."}]


def numpy_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1]
    return r**2, r, slope, intercept


def test_eval_rm_r2_fits_the_true_score_on_the_reward_per_filter(tiny_rm, tmp_path, capsys):
    rows = samples()
    rewards = load_reward_model(tiny_rm, batch_size=16)([r["prompt"] for r in rows],
                                                         [r["completion"] for r in rows]).numpy()
    # a true score that the reward explains in part: affine in the reward plus fixed noise
    noise = np.random.default_rng(0).normal(scale=rewards.std(), size=len(rows))
    for row, reward, wobble in zip(rows, rewards, noise, strict=True):
        row["score"] = float(2.0 * reward + 1.0 + wobble)
    data = write_jsonl(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "r2.json"
    assert main(["eval-rm", "--model", str(tiny_rm), "--data", data, "--r2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["kind"] == "sequence_classifier"
    r2 = results["r2"]
    assert (r2["n_samples"], r2["n_groups"], r2["groups_of_one"], r2["score_column"]) == (13, 4, 1, "score")

    x, y = rewards.astype(np.float64), np.array([row["score"] for row in rows])
    groups = [list(range(4 * g, 4 * g + 4)) for g in range(3)] + [[12]]
    best = [g[int(np.argmax(x[g]))] for g in groups]
    worst = [min((i for i in g if i != b), key=lambda i: x[i]) for g, b in zip(groups, best, strict=True) if len(g) > 1]
    for name, kept in (("all", list(range(13))), ("best_of_n", best), ("best_worst", best + worst)):
        values = r2["filters"][name]
        assert values["n_kept"] == len(kept), name
        expected = numpy_fit(x[kept], y[kept])
        got = (values["r2"], values["pearson"], values["slope"], values["intercept"])
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), name
    assert r2["filters"]["best_random"]["n_kept"] == 7
    assert "1 prompt group(s) of one sample" in r2["filters"]["best_worst"]["note"]
    for name in ("all", "best_of_n", "best_random", "best_worst"):
        line = next(line for line in printed.splitlines() if line.startswith(name + " "))
        assert f"{r2['filters'][name]['r2']:.4f}" in line.split()
    assert "note: best_random: 1 prompt group(s) of one sample" in printed


def test_eval_rm_r2_constant_true_score_is_null_with_a_note(tiny_rm, tmp_path, capsys):
    """--score-column pass_rate, every sample passing: R² undefined -> null in the JSON, a note
    in the table, exit 0."""
    rows = [{**row, "pass_rate": 1} for row in samples()]
    data = write_jsonl(tmp_path / "flat.jsonl", rows)
    out = tmp_path / "flat.json"
    args = ["eval-rm", "--model", str(tiny_rm), "--data", data, "--r2", "--score-column", "pass_rate"]
    assert main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    assert "NaN" not in text  # strict JSON
    for values in json.loads(text)["r2"]["filters"].values():
        assert values["r2"] is None and values["pearson"] is None
        assert "true score is constant" in values["note"] and values["intercept"] == 1.0
    assert "note: all: the true score is constant: R² undefined" in printed
    assert not math.isnan(json.loads(text)["r2"]["reward_mean"])
