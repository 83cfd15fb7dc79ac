"""salsa (SALSA's soup reference): the weighted average of checkpoints by worked examples and on
two tiny models of different seeds, its weights and mismatched checkpoints refused in one line;
on a tiny model it learns count_e; its KL is to the soup (a soup of one model twice is plain PPO
with that reference, exactly); policy_init=soup starts the policy at the soup; exact resume;
the CLI with --ref-model A,B."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from run_helpers import (
    assert_resumed_matches,
    assert_same_parameters,
    read_metrics,
    run_interrupted_and_resumed,
    write_jsonl,
)
from test_online import PROMPTS, one_thread, run  # noqa: F401  (one_thread: the module's autouse fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.cli import main as cli_main
from alignkit.models import load_model
from alignkit.models.soup import load_soup, parse_soup_weights, weight_soup
from alignkit.testing import build_tiny_model


def noisy_copy(model_dir, folder, seed: int = 1, std: float = 0.02):
    """A second 'SFT checkpoint' from the same init: the model plus seeded Gaussian noise."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sibling_dir(tiny_model_dir, tmp_path_factory):
    return noisy_copy(tiny_model_dir, tmp_path_factory.mktemp("sibling"))


def test_weight_soup_worked_example():
    """0.25 x [1, 2] + 0.75 x [3, 6] = [2.5, 5.0]; an integer buffer equal in both is kept, one
    that differs is refused; fewer than two checkpoints are refused."""
    first = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([0, 1])}
    second = {"w": torch.tensor([3.0, 6.0]), "ids": torch.tensor([0, 1])}
    soup = weight_soup([("a", first), ("b", second)], [0.25, 0.75])
    torch.testing.assert_close(soup["w"], torch.tensor([2.5, 5.0]))
    assert soup["ids"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="non-float tensor ids differs"):
        weight_soup([("a", first), ("b", {**second, "ids": torch.tensor([0, 2])})], [0.5, 0.5])
    with pytest.raises(ValueError, match="two or more"):
        weight_soup([("a", first)], [1.0])


def test_soup_of_two_tiny_models_is_their_weighted_average(tmp_path):
    """Two tiny models of seeds 0 and 1, weights 0.25 / 0.75: every parameter of the loaded soup
    is 0.25 theta_0 + 0.75 theta_1."""
    first, second = build_tiny_model(tmp_path / "s0", seed=0), build_tiny_model(tmp_path / "s1", seed=1)
    soup = load_soup([str(first), str(second)], [0.25, 0.75], device="cpu")
    theta0, theta1 = (load_model(str(d), device="cpu")[0].state_dict() for d in (first, second))
    assert not torch.equal(theta0["lm_head.weight"], theta1["lm_head.weight"])
    for name, tensor in soup.state_dict().items():
        torch.testing.assert_close(tensor, 0.25 * theta0[name] + 0.75 * theta1[name], msg=name)


def test_soup_weights_are_parsed_and_checked():
    assert parse_soup_weights(None, 4) == [0.25] * 4
    assert parse_soup_weights("0.2,0.8", 2) == [0.2, 0.8]
    for text, message in [("0.5", "has 1 weight"), ("0.7,0.7", "sums to 1.4"), ("a,b", "comma-separated numbers"),
                          ("-0.5,1.5", ">= 0")]:
        with pytest.raises(ValueError, match=message):
            parse_soup_weights(text, 2)


def test_mismatched_checkpoints_are_refused(tiny_model_dir, tmp_path):
    """A wider model: the first differing parameter is named with both shapes; a deeper one: the
    first extra parameter; another tokenizer: named too."""
    wide = build_tiny_model(tmp_path / "wide", hidden_size=48)
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight is \(\d+, 32\) in .* but \(\d+, 48\)"):
        load_soup([str(tiny_model_dir), str(wide)], [0.5, 0.5], device="cpu")
    deep = build_tiny_model(tmp_path / "deep", num_layers=3)
    with pytest.raises(ValueError, match="'model.layers.2.*' is extra"):
        load_soup([str(tiny_model_dir), str(deep)], [0.5, 0.5], device="cpu")
    other = build_tiny_model(tmp_path / "vocab", vocab_size=300)
    _, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    with pytest.raises(ValueError, match="tokenizer of .*vocab differs from the policy's"):
        load_soup([str(tiny_model_dir), str(other)], [0.5, 0.5], device="cpu", tokenizer=tokenizer)


def test_salsa_learns_count_e(tiny_model_dir, sibling_dir, tmp_path):
    """40 steps against the soup of the tiny model and its noisy sibling. Measured: reward/mean
    0.30 over the first 5 steps -> 7.95 over the last 5 (ppo, reference = --model: 0.30 -> 7.89);
    the KL to the soup is 0.02 at step 1 (the policy, --model, is not the soup)."""
    run("salsa", tiny_model_dir, tmp_path / "salsa", steps=40, ref_model=f"{tiny_model_dir},{sibling_dir}")
    rows = read_metrics(tmp_path / "salsa")
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 5.0, (first, last)
    assert rows[0]["kl"] > 1e-3 and "value_loss" in rows[0]


def test_a_soup_of_one_model_twice_is_ppo_with_that_reference(tiny_model_dir, sibling_dir, tmp_path):
    """salsa --ref-model B,B (0.5 B + 0.5 B = B bit for bit) and ppo --ref-model B log the same
    numbers and end at the same weights, exactly: the KL is measured against the soup."""
    run("salsa", tiny_model_dir, tmp_path / "salsa", steps=6, ref_model=f"{sibling_dir},{sibling_dir}")
    run("ppo", tiny_model_dir, tmp_path / "ppo", steps=6, ref_model=str(sibling_dir))
    salsa, ppo = read_metrics(tmp_path / "salsa"), read_metrics(tmp_path / "ppo")
    assert ppo[0]["kl"] != 0.0
    for a, b in zip(salsa, ppo, strict=True):
        for key in a.keys() - {k for k in a if k.startswith(("time/", "throughput/"))}:
            assert a[key] == b[key], (a["step"], key)
    soup = AutoModelForCausalLM.from_pretrained(tmp_path / "salsa" / "final")
    assert all(torch.equal(p, q) for p, q in zip(soup.parameters(),
                                                   AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "final")
                                                   .parameters(), strict=True))


def test_policy_init_soup_starts_the_policy_at_the_soup(tiny_model_dir, sibling_dir, tmp_path):
    """policy_init=soup: the policy is the reference at step 1 (KL 0), unlike policy_init=first;
    with LoRA the adapter-off base is the soup, so the KL is 0 at step 1 too (B = 0)."""
    refs = f"{tiny_model_dir},{sibling_dir}"
    run("salsa", tiny_model_dir, tmp_path / "soup", steps=1, ref_model=refs, policy_init="soup")
    assert abs(read_metrics(tmp_path / "soup")[0]["kl"]) < 1e-6
    run("salsa", tiny_model_dir, tmp_path / "lora", steps=2, ref_model=refs, policy_init="soup", lora_r=4)
    lora = read_metrics(tmp_path / "lora")
    assert abs(lora[0]["kl"]) < 1e-5 and lora[1]["kl"] != 0.0
    run("salsa", tiny_model_dir, tmp_path / "first", steps=1, ref_model=refs)
    assert read_metrics(tmp_path / "first")[0]["kl"] > 1e-3



def test_an_evaluation_of_a_salsa_run_finds_its_soup_reference(tiny_model_dir, sibling_dir, tmp_path):
    """`alignkit eval` takes the reference of a run from its config.yaml: for salsa the soup of
    --ref-model A,B with its weights (soup:A,B:0.3,0.7), rebuilt exactly."""
    from alignkit.lab.policy_loading import base_model_of, load_policy

    run("salsa", tiny_model_dir, tmp_path / "run", steps=1, ref_model=f"{tiny_model_dir},{sibling_dir}",
        soup_weights="0.3,0.7")
    spec = base_model_of(tmp_path / "run" / "final")
    assert spec == f"soup:{tiny_model_dir},{sibling_dir}:0.3,0.7"
    reference, _ = load_policy(spec, device="cpu")
    expected = load_soup([str(tiny_model_dir), str(sibling_dir)], [0.3, 0.7], device="cpu")
    for (name, p), (_, q) in zip(reference.named_parameters(), expected.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_salsa_resumes_exactly(tiny_model_dir, sibling_dir, tmp_path):
    train = partial(run, "salsa", tiny_model_dir, steps=6, save_steps=3, lr=5e-3,
                    ref_model=f"{tiny_model_dir},{sibling_dir}", soup_weights="0.3,0.7")
    runs = run_interrupted_and_resumed(train, tmp_path, at=5)
    keys = ("loss", "reward/mean", "kl", "value_loss", "grad_norm")
    assert_resumed_matches(runs.full, runs.resumed, keys, steps=6, tolerance=dict(rel=1e-5, abs=1e-6))
    assert_same_parameters(runs.full_result.model, runs.resumed_result.model)


def test_salsa_from_the_cli(tiny_model_dir, sibling_dir, tmp_path, capsys):
    """--ref-model A,B is checked checkpoint by checkpoint; the soup weights reach config.yaml."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    args = ["train", "salsa", "--model", str(tiny_model_dir), "--data", data, "--output", str(tmp_path / "run"),
            "--reward", "dist_helpers:count_e", "--batch-size", "2", "--max-steps", "2", "--no-progress",
            "--set", "max_new_tokens=4", "--set", "soup_weights=0.25,0.75", "--allow-degenerate"]
    assert cli_main([*args, "--ref-model", f"{tiny_model_dir},{tmp_path / 'missing'}"]) != 0
    assert f"--ref-model {tmp_path / 'missing'}: no such model directory" in capsys.readouterr().err
    assert cli_main([*args, "--ref-model", f"{tiny_model_dir},{sibling_dir}"]) == 0
    assert len(read_metrics(tmp_path / "run")) == 2
    assert "soup_weights: 0.25,0.75" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize(("algorithm", "settings", "message"), [
    ("salsa", {"ref_model": "{a}"}, "two or more SFT checkpoints"),
    ("salsa", {}, "two or more SFT checkpoints"),
    ("ppo", {"ref_model": "{a},{b}"}, "names 2 checkpoints: a reference soup is salsa's"),
    ("salsa", {"ref_model": "{a},{b}", "soup_weights": "0.5"}, "has 1 weight"),
    ("salsa", {"ref_model": "{a},{b}", "soup_weights": "0.7,0.7"}, "sums to 1.4"),
    ("ppo", {"policy_init": "soup"}, "--set soup=true"),
    ("salsa", {"ref_model": "{a},{b}", "policy_init": "model"}, "policy_init must be one of"),
    ("salsa", {"ref_model": "{a},{b}", "lora_r": 4}, "--set policy_init=soup"),
    ("salsa", {"ref_model": "{a},{b}", "beta": 0.0}, "--ref-model is ignored by salsa: with beta=0.0"),
])
def test_bad_salsa_settings_are_refused(algorithm, settings, message, tiny_model_dir, sibling_dir, tmp_path):
    settings = {k: v.format(a=tiny_model_dir, b=sibling_dir) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(ValueError, match=message):
        run(algorithm, tiny_model_dir, tmp_path / "bad", steps=1, **settings)


def test_salsa_takes_its_soup_as_a_merge_spec(tiny_model_dir, sibling_dir, tmp_path):
    """--ref-model merge:soup:A,B is the same reference as --ref-model A,B: the same run, exactly
    (policy_init=soup too); soup_weights beside a spec is refused (the spec carries its weights)."""
    pair = f"{tiny_model_dir},{sibling_dir}"
    run("salsa", tiny_model_dir, tmp_path / "list", steps=3, ref_model=pair, policy_init="soup")
    run("salsa", tiny_model_dir, tmp_path / "spec", steps=3, ref_model=f"merge:soup:{pair}", policy_init="soup")
    keys = ("loss", "reward/mean", "kl", "grad_norm")
    assert [[r[k] for k in keys] for r in read_metrics(tmp_path / "list")] == [
        [r[k] for k in keys] for r in read_metrics(tmp_path / "spec")]
    with pytest.raises(ValueError, match="carries its own weights"):
        run("salsa", tiny_model_dir, tmp_path / "bad", steps=1, ref_model=f"merge:soup:{pair}", soup_weights="0.5,0.5")
