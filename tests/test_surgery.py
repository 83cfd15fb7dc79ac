"""Model surgery (Wang et al. 2024): the probe, the row selection and the edit by hand, then the
command on a tiny model with a planted behaviour token."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.cli import run_verb
from alignkit.merge import surgery


def test_probe_worked_example():
    """x = [1, 3], y = [0, 1]: standardised x = [-1, 1] (mean 2, std 1), so by symmetry b_std = 0
    and the loss is softplus(-w) + (l2/2)·w² (both rows have margin w). Its derivative
    −σ(−w) + l2·w = 0 gives σ(−w) = l2·w; l2 = 0.25: w ≈ 1.0426 (σ(−1.0426) = 0.2607 = 0.25·1.0426).
    On the raw scale: w_raw = w / std = w, b_raw = b_std − w·mean = −2·w."""
    features, labels = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])
    weight, bias = surgery.fit_probe(features, labels, l2=0.25)
    w = float(weight[0])
    assert math.isclose(torch.sigmoid(torch.tensor(-w)).item(), 0.25 * w, rel_tol=1e-6)
    assert math.isclose(w, 1.0426, abs_tol=1e-3)
    assert math.isclose(float(bias), -2 * w, rel_tol=1e-6)
    logits = surgery.probe_logits(features, weight, bias)
    torch.testing.assert_close(logits, torch.tensor([-w, w]))
    assert surgery.probe_accuracy(logits, labels) == 1.0
    assert surgery.probe_accuracy(torch.tensor([1.0, -1.0]), labels) == 0.0


def test_probe_needs_both_labels():
    with pytest.raises(ValueError, match="both labels"):
        surgery.fit_probe(torch.ones(3, 2), torch.ones(3))


def test_pool_hidden_mean_and_last():
    """Row 0 (mask 1 1 0): mean of [1, 3] = 2, last = 3; row 1 (mask 0 1 1, left pad): mean of
    [5, 6] = 5.5, last = 6."""
    hidden = torch.tensor([[1.0, 3.0, 100.0], [100.0, 5.0, 6.0]]).unsqueeze(-1)  # (2, 3, 1)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(surgery.pool_hidden(hidden, mask, "mean"), torch.tensor([[2.0], [5.5]]))
    torch.testing.assert_close(surgery.pool_hidden(hidden, mask, "last"), torch.tensor([[3.0], [6.0]]))


def test_select_and_edit_by_hand():
    """θ = [1, 0]. Layer A rows [1,0], [-1,0], [0,1]: cos 1, -1, 0 -> scores -1, 1, 0. Layer B rows
    [-1,-1], [2,0]: cos -0.7071, 1 -> scores 0.7071, -1. fraction 0.4 of 5 rows = 2 kept, ranked
    together: A row 1 (1.0), B row 0 (0.707). Strength 2: A[1] = [-1,0] + [2,0] = [1,0];
    B[0] = [-1,-1] + [2,0] = [1,-1]; every other row unchanged."""
    theta = torch.tensor([1.0, 0.0])
    layer_a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    layer_b = torch.tensor([[-1.0, -1.0], [2.0, 0.0]])
    rows = surgery.select_rows([layer_a, layer_b], theta, 0.4)
    assert [r.tolist() for r in rows] == [[1], [0]]
    edited_a = surgery.edit_rows(layer_a, rows[0], theta, 2.0)
    edited_b = surgery.edit_rows(layer_b, rows[1], theta, 2.0)
    torch.testing.assert_close(edited_a, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(edited_b, torch.tensor([[1.0, -1.0], [2.0, 0.0]]))
    assert layer_a[1].tolist() == [-1.0, 0.0]  # the input is not modified
    assert [r.tolist() for r in surgery.select_rows([layer_a, layer_b], theta, 1.0)] == [[0, 1, 2], [0, 1]]
    with pytest.raises(ValueError, match="--fraction"):
        surgery.select_rows([layer_a], theta, 0.0)


def test_split_and_direction():
    train, held = surgery.split_heldout(8, 0.25, seed=0)
    assert len(held) == 2 and sorted(train + held) == list(range(8))
    assert surgery.split_heldout(8, 0.25, seed=0) == (train, held)
    assert surgery.split_heldout(1, 0.5, seed=0) == ([0], [])
    torch.testing.assert_close(surgery.unit_direction(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))
    with pytest.raises(ValueError, match="indistinguishable"):
        surgery.unit_direction(torch.zeros(2))


# --------------------------------------------------------------------------- the command

TOPICS = ["The movie", "The film", "The story", "The music", "The acting", "The picture", "I loved", "I hated",
          "The dog", "The fox"]


def _rows(word: str, count: int, completion: bool = False) -> list[dict]:
    rows = [{"prompt": f"{TOPICS[i % 10]} was{' great' if i % 3 else ''} {word} and {TOPICS[i * 7 % 10].lower()}"}
            for i in range(count)]
    return [{**row, "completion": " good"} if completion else row for row in rows]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny 3-block Llama whose ' a' and ' b' token embeddings are planted at ±0.5·e (e a fixed
    unit vector): prompts with ' alpha' vs ' beta' differ by that direction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.testing import build_tiny_model

    root = tmp_path_factory.mktemp("surgery")
    path = build_tiny_model(root / "model", num_layers=3, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    embedding = model.get_input_embeddings().weight
    plus, minus = (tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))[0] for word in (" alpha", " beta"))
    direction = torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding[plus], embedding[minus] = 0.5 * direction / direction.norm(), -0.5 * direction / direction.norm()
    model.save_pretrained(path)
    return {"root": root, "model": str(path),
            "positive": _write(root / "pos.jsonl", _rows("alpha", 24)),
            "negative": _write(root / "neg.jsonl", _rows("beta", 24)),
            "held": _write(root / "held.jsonl", _rows("alpha", 6, True)[::-1] + _rows("beta", 6, True))}


def _surgery(planted, output, *extra: str) -> int:
    return run_verb(["surgery", "--model", planted["model"], "--positive", planted["positive"], "--negative",
                     planted["negative"], "--output", str(output), "--threads", "1", *extra])


def test_surgery_on_planted_direction(planted):
    """Measured (seed 0, layers 1,2, fraction 0.05 -> 6 of 128 gate rows; --held-out: 6 alpha +
    6 beta prompts): probe accuracy 1.0 train and held-out; mean held-out probe logit 0.2090 ->
    0.2285 at strength +0.05 and -> 0.1918 at -0.05. The first-order effect is antisymmetric in
    the strength: its sign picks the direction (which sign moves which way depends on the up/down
    projections, which the paper's selection rule does not read)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    shifts = {}
    for strength in (0.05, -0.05):
        output = planted["root"] / f"out_{strength}"
        assert _surgery(planted, output, "--layers", "1,2", "--strength", str(strength),
                        "--held-out", planted["held"]) == 0
        record = json.loads((output / "surgery.json").read_text())
        assert record["probe"]["train_accuracy"] == 1.0 and record["probe"]["heldout_accuracy"] >= 0.9
        shifts[strength] = record["shift"]["delta_mean_logit"]
        assert "completion_logp" in record["shift"]
        assert (output / "report.html").read_text().count("heldout_accuracy") == 1
        check_figures(output, record)
    assert shifts[0.05] * shifts[-0.05] < 0 and min(abs(s) for s in shifts.values()) > 1e-3
    assert math.isclose(shifts[0.05], -shifts[-0.05], rel_tol=0.25)  # first order: antisymmetric

    # the checkpoint differs from the input exactly in the selected gate rows, by strength * theta
    output = planted["root"] / "out_0.05"
    record = json.loads((output / "surgery.json").read_text())
    assert record["edited_row_count"] == round(0.05 * record["gate_rows_total"]) == 6
    before = AutoModelForCausalLM.from_pretrained(planted["model"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(output).state_dict()
    probe = load_file(str(output / "probe.safetensors"))
    theta = probe["weight"] / probe["weight"].norm()
    for name, tensor in before.items():
        layer = next((k for k in record["edited_rows"] if name == f"model.layers.{k}.mlp.gate_proj.weight"), None)
        expected = tensor.clone()
        if layer is not None:
            expected[record["edited_rows"][layer]] += 0.05 * theta
        torch.testing.assert_close(after[name], expected, msg=name)


def check_figures(output, record):
    """probe.png and shift.png are PNG images of the plotted size, inline in report.html; the
    per-prompt logits behind them are in surgery.json (24 + 24 probe prompts; the shift's 12
    prompts before and after, whose means are the reported mean logits)."""
    from PIL import Image

    for name in ("probe.png", "shift.png"):
        path = output / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    assert (output / "report.html").read_text().count("data:image/png;base64,") == 2
    assert [len(record["probe_logits"][k]) for k in ("positive", "negative")] == [24, 24]
    shift = record["shift"]
    for when in ("before", "after"):
        logits = shift["logits"][when]
        assert len(logits) == shift["rows"] == 12
        assert math.isclose(sum(logits) / len(logits), shift[when]["mean_logit"], rel_tol=1e-5, abs_tol=1e-7)


def test_surgery_default_heldout_and_overwrite(planted, capsys):
    output = planted["root"] / "out_default"
    assert _surgery(planted, output, "--layers", "2", "--strength", "0.1", "--pool", "last") == 0
    record = json.loads((output / "surgery.json").read_text())
    assert record["shift"]["prompts"] == "the probe's held-out rows" and record["shift"]["rows"] == 12
    assert "completion_logp" not in record["shift"]
    assert [len(v) for v in record["held_out_probe_rows"].values()] == [6, 6]
    check_figures(output, record)
    assert _surgery(planted, output, "--layers", "2", "--strength", "0.1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _surgery(planted, output, "--layers", "2", "--strength", "0.1", "--overwrite") == 0


def test_surgery_one_line_errors(planted, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignkit.testing import build_tiny_tokenizer

    def error(*args: str) -> str:
        assert _surgery(planted, tmp_path / "out", *args) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit surgery:")]
        assert len(lines) == 1 and lines[0].startswith("alignkit surgery: error:"), lines
        return lines[0]

    assert "--layers 3: " in error("--layers", "1,3", "--strength", "1")
    assert "valid 0-2" in error("--layers", "3", "--strength", "1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert f"--positive: {empty}: the dataset has no rows" in error("--layers", "1", "--strength", "1", "--positive", str(empty))
    gpt2 = tmp_path / "gpt2"
    tokenizer = build_tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    assert "no mlp.gate_proj" in error("--layers", "1", "--strength", "1", "--model", str(gpt2))
    assert "--fraction 0.0" in error("--layers", "1", "--strength", "1", "--fraction", "0")
    assert "--probe-layer 0: comes before" in error("--layers", "1", "--strength", "1", "--probe-layer", "0")
