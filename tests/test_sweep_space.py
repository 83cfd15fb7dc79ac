"""`alignkit sweep`'s pure parts: the space file, seeds, direction, scores and the report maths."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("optuna")

from alignkit.sweep.report import optimism, seed_interval  # noqa: E402
from alignkit.sweep.runner import ask_values  # noqa: E402
from alignkit.sweep.scoring import is_better, mean_score, metric_score  # noqa: E402
from alignkit.sweep.space import (  # noqa: E402
    Distribution,
    check_disjoint_seeds,
    default_direction,
    load_space,
    parse_distribution,
    parse_seeds,
    parse_space,
)


def test_space_worked_example_parses_each_type_in_file_order(tmp_path):
    """1.0e-5 and 1e-3 are YAML 1.2 floats; a dashed key becomes the underscore field name."""
    path = tmp_path / "space.yaml"
    path.write_text("lr: {type: float, low: 1.0e-5, high: 1e-3, log: true}\n"
                    "lora-r: {type: int, low: 4, high: 16, step: 4}\n"
                    "scheduler: {type: categorical, choices: [cosine, constant]}\n")
    space = load_space(path)
    assert list(space) == ["lr", "lora_r", "scheduler"]
    assert space["lr"] == Distribution("float", 1e-5, 1e-3, log=True)
    assert space["lora_r"] == Distribution("int", 4, 16, step=4)
    assert space["scheduler"] == Distribution("categorical", choices=("cosine", "constant"))
    assert space["lora_r"].to_optuna().step == 4 and space["lr"].to_optuna().log
    assert space["scheduler"].extremes() == ["cosine", "constant"] and space["lr"].extremes() == [1e-5, 1e-3]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"type": "uniform", "low": 0, "high": 1}, "type must be float, int or categorical"),
        ({"type": "float", "low": "small", "high": 1.0}, "low must be a finite number"),
        ({"type": "float", "low": 0.1}, "high is required"),
        ({"type": "int", "low": 1.5, "high": 4}, "low must be a finite integer"),
        ({"type": "float", "low": 2.0, "high": 1.0}, "low (2.0) is above high (1.0)"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log: true needs low > 0"),
        ({"type": "float", "low": 0.1, "high": 1.0, "log": "yes"}, "log must be true or false"),
        ({"type": "int", "low": 1, "high": 9, "step": 0}, "step must be a positive integer"),
        ({"type": "float", "low": 0.1, "high": 1.0, "step": 0.1, "log": True}, "cannot be combined"),
        ({"type": "categorical", "choices": []}, "choices must be a non-empty list"),
        ({"type": "categorical", "choices": [[1, 2]]}, "choices must be numbers, strings"),
        ({"type": "categorical", "choices": [1, 1]}, "choices repeat a value"),
        ({"type": "float", "low": 0, "high": 1, "choices": [1]}, "unknown field(s) ['choices']"),
        (0.1, "expected a mapping"),
    ],
)
def test_bad_distribution_is_refused_naming_the_file_and_key(spec, problem):
    with pytest.raises(ValueError) as caught:
        parse_distribution("beta", spec, "space.yaml")
    assert str(caught.value).startswith("space.yaml: key 'beta': ") and problem in str(caught.value)


def test_space_must_be_a_mapping_and_may_not_set_what_the_sweep_sets():
    with pytest.raises(ValueError, match="space.yaml: a space must be a non-empty YAML mapping"):
        parse_space([{"lr": 1}], "space.yaml")
    with pytest.raises(ValueError, match="key 'seed' is set by the sweep itself"):
        parse_space({"seed": {"type": "int", "low": 0, "high": 3}}, "space.yaml")
    with pytest.raises(ValueError, match="key 'lora_r' given twice"):
        parse_space({"lora-r": {"type": "int", "low": 1, "high": 2},
                     "lora_r": {"type": "int", "low": 1, "high": 2}}, "space.yaml")


def test_a_missing_space_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml: no such file"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: {type: float, low: [\n")
    with pytest.raises(ValueError, match="bad.yaml, line .*YAML syntax error"):
        load_space(bad)


def test_seeds_parse_and_tuning_and_test_seeds_must_be_disjoint():
    assert parse_seeds("0, 1", "--tune-seeds") == [0, 1]
    with pytest.raises(ValueError, match=r"--tune-seeds '0,x': .* got 'x'"):
        parse_seeds("0,x", "--tune-seeds")
    with pytest.raises(ValueError, match="--test-seeds '3,3': a seed is repeated"):
        parse_seeds("3,3", "--test-seeds")
    with pytest.raises(ValueError, match="-1"):
        parse_seeds("-1", "--test-seeds")
    check_disjoint_seeds([0, 1], [7, 8])
    with pytest.raises(ValueError, match=r"disjoint from --tune-seeds; both contain \[1\]"):
        check_disjoint_seeds([0, 1], [1, 2])


def test_default_direction_by_metric_name():
    assert default_direction("loss") == "minimize" and default_direction("eval/loss") == "minimize"
    assert default_direction("kl") == "minimize"
    assert default_direction("reward/mean") == "maximize" and default_direction("eval/gold") == "maximize"
    assert default_direction("rewards/accuracies") == "maximize"
    with pytest.raises(ValueError, match="--metric entropy: .* pass --direction"):
        default_direction("entropy")


def test_metric_score_last_value_or_mean_of_last_k_logged_values():
    """eval/loss is logged at steps 2 and 3 only: last value 0.5; last 2 logged: (0.7 + 0.5) / 2."""
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval/loss": 0.7},
            {"step": 3, "loss": 1.0, "eval/loss": 0.5}]
    assert metric_score(rows, "loss") == 1.0
    assert metric_score(rows, "loss", last_k=2) == 1.5
    assert metric_score(rows, "eval/loss", last_k=2) == pytest.approx(0.6)
    assert metric_score(rows, "loss", last_k=10) == 2.0  # fewer values than k: all of them
    with pytest.raises(ValueError, match="runs/x: metric 'reward/mean' is never logged; logged: eval/loss, loss"):
        metric_score(rows, "reward/mean", source="runs/x")


def test_mean_over_seeds_keeps_a_diverged_seed_visible_and_nan_never_wins():
    assert mean_score([0.5, 1.5]) == 1.0
    assert math.isnan(mean_score([0.5, float("inf")]))
    assert is_better(0.1, 0.2, "minimize") and not is_better(0.1, 0.2, "maximize")
    assert not is_better(float("nan"), 0.2, "maximize") and is_better(0.3, None, "maximize")


def test_seed_interval_and_optimism_worked_examples():
    """Scores 1 and 3: mean 2; every bootstrap mean lies in [1, 3]. Tuning 2 vs test 1.5 when
    maximizing: the search looked 0.5 better than it is."""
    mean, low, high = seed_interval([1.0, 3.0], 500, 0)
    assert mean == 2.0 and 1.0 <= low < 2.0 < high <= 3.0
    assert all(math.isnan(v) for v in seed_interval([1.0, float("nan")], 500, 0))
    assert optimism(2.0, 1.5, "maximize") == 0.5 and optimism(1.0, 1.5, "minimize") == 0.5


def test_same_sampler_seed_samples_the_same_values_and_another_seed_differs():
    import optuna

    space = parse_space({"lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                         "beta": {"type": "categorical", "choices": [0.1, 0.2, 0.5]}})

    def draws(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        values = []
        for _ in range(3):
            trial, sampled = ask_values(study, space)
            study.tell(trial, sampled["lr"])
            values.append(sampled)
        return values

    first = draws(3)
    assert first == draws(3)
    assert first != draws(4)
    assert all(1e-5 <= v["lr"] <= 1e-2 and v["beta"] in (0.1, 0.2, 0.5) for v in first)
