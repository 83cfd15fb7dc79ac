"""`alignkit eval-rm --policy`: DPO's implicit reward beta*log(pi/ref) evaluated like a reward
model: it equals a hand-computed log-ratio, a DPO-trained tiny policy ranks its training rule's
pairs far above chance, the reference against itself ties every pair, and an explicit RM is
reported beside it with the numbers `eval-rm --model` gives."""

from __future__ import annotations

import json

import pytest
import torch
from reward_helpers import train_tiny
from run_helpers import write_jsonl

from alignkit.cli import main
from alignkit.data import load_rows
from alignkit.eval.reward_eval import pairwise_metrics
from alignkit.lab.implicit_rm import implicit_pair_rewards
from alignkit.models import load_model, save_pretrained_merged
from alignkit.testing import NEGATIVE_WORDS, POSITIVE_WORDS, synthetic_pairs


@pytest.fixture(scope="module")
def dpo_final(tiny_model_dir, tmp_path_factory):
    """A tiny policy DPO-trained (beta 0.2) on the positive-over-negative review rule."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    train_tiny("dpo", synthetic_pairs(64, seed=0), out, model_dir=tiny_model_dir, max_steps=24, lr=3e-3,
               beta=0.2)
    return out / "final"


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """Held-out pairs of the training rule, and shifted pairs (another template, one word each)."""
    root = tmp_path_factory.mktemp("pairs")
    shifted = [{"prompt": "How did you feel?", "chosen": f" I felt {good}.", "rejected": f" I felt {bad}."}
               for good in POSITIVE_WORDS for bad in NEGATIVE_WORDS]
    return (write_jsonl(root / "in_distribution.jsonl", synthetic_pairs(32, seed=1)),
            write_jsonl(root / "shifted.jsonl", shifted))


def test_pairwise_metrics_count_ties_and_half_credit():
    """margins (1, 0, -1, 0): strict accuracy 1/4, 2 ties, ties-half (1 + .5 + 0 + .5)/4 = 0.5"""
    metrics = pairwise_metrics([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 5.0], n_bootstrap=50)
    assert (metrics["accuracy"], metrics["ties"], metrics["accuracy_ties_half"]) == (0.25, 2, 0.5)


def test_implicit_rewards_equal_beta_times_the_summed_response_log_ratio(dpo_final, tiny_model_dir, pair_files):
    policy, tokenizer = load_model(str(dpo_final), device="cpu")
    reference, _ = load_model(str(tiny_model_dir), device="cpu")
    table = load_rows(pair_files[0])
    chosen, rejected = implicit_pair_rewards(policy, reference, tokenizer, table, beta=0.2, batch_size=5)

    def summed_logp(model, prompt: str, response: str) -> float:  # full logits, by hand
        """sum_t log p(y_t | x, y_<t) over the response and its eos (as DPO training renders it)"""
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        return float(logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum())

    row = table.rows[3]
    for reward, response in ((chosen[3], row["chosen"]), (rejected[3], row["rejected"])):
        expected = 0.2 * (summed_logp(policy, row["prompt"], response) - summed_logp(reference, row["prompt"], response))
        assert reward.item() == pytest.approx(expected, abs=1e-4)
    assert chosen.shape == rejected.shape == (32,)


def test_a_dpo_policys_implicit_rm_beats_chance_beside_an_explicit_rm(dpo_final, tiny_model_dir, pair_files, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_model(str(tiny_model_dir), kind="reward", device="cpu")
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    rm_dir = save_pretrained_merged(model, tokenizer, tmp_path / "rm")
    in_distribution, shifted = pair_files
    out = tmp_path / "implicit.json"
    assert main(["eval-rm", "--policy", str(dpo_final), "--data", in_distribution, "--shifted", shifted,
                 "--model", str(rm_dir), "--n-bootstrap", "200", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["beta"] == 0.2 and report["reference"] == str(tiny_model_dir)  # from the run's config
    assert set(report["datasets"]) == {"in_distribution.jsonl", "shifted.jsonl"}
    implicit = report["datasets"]["in_distribution.jsonl"]["implicit"]
    assert implicit["n_pairs"] == 32 and implicit["accuracy"] >= 0.8 and implicit["accuracy_ci"][0] > 0.5
    assert report["datasets"]["shifted.jsonl"]["implicit"]["n_pairs"] == 25
    # the explicit RM's numbers are exactly what eval-rm --model reports on the same file
    explicit = report["datasets"]["in_distribution.jsonl"]["explicit"]
    plain = tmp_path / "plain.json"
    assert main(["eval-rm", "--model", str(rm_dir), "--data", in_distribution, "--n-bootstrap", "200", "--batch-size", "8",
                 "--output", str(plain)]) == 0
    expected = json.loads(plain.read_text())
    assert explicit["accuracy"] == expected["accuracy"] and explicit["scores"] == expected["scores"]


def test_the_reference_against_itself_ties_every_pair(tiny_model_dir, pair_files, tmp_path, capsys):
    out = tmp_path / "self.json"
    assert main(["eval-rm", "--policy", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--data",
                 pair_files[0], "--set", "beta=0.5", "--n-bootstrap", "50", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["datasets"]["in_distribution.jsonl"]["implicit"]
    # eval-rm's rule is strict (ties fail): 0 accuracy, 0.5 with ties counted half
    assert (metrics["accuracy"], metrics["ties"], metrics["accuracy_ties_half"]) == (0.0, 32, 0.5)
    assert metrics["scores"]["margin"]["max"] == metrics["scores"]["margin"]["min"] == 0.0
    assert "in_distribution.jsonl" in capsys.readouterr().out


def test_bad_flags_are_one_line_errors(tiny_model_dir, pair_files, capsys):
    assert main(["eval-rm", "--policy", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--data",
                 pair_files[0], "--set", "gamma=1"]) == 2
    assert "eval-rm --policy takes --set beta=B only" in capsys.readouterr().err
    assert main(["eval-rm", "--policy", str(tiny_model_dir), "--data", pair_files[0]]) == 2
    assert "give --reference" in capsys.readouterr().err
    assert main(["eval-rm", "--policy", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--data",
                 pair_files[0], "--set", "beta=0"]) == 2
    assert "beta must be > 0" in capsys.readouterr().err
