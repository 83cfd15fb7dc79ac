"""`alignkit sweep` end to end on a tiny model: 3 DPO trials x 2 steps on tuning seeds {0, 1},
the best re-run on test seeds {7, 8}; every file checked against the runs' own metrics; an
interrupted sweep resumed samples and scores exactly what the uninterrupted one did."""

from __future__ import annotations

import json

import pytest
import yaml
from run_helpers import read_metrics, write_jsonl

pytest.importorskip("optuna")

from alignkit.cli import main  # noqa: E402
from alignkit.sweep import runner  # noqa: E402
from alignkit.testing import synthetic_pairs  # noqa: E402

SPACE = ("lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n"
         "beta: {type: categorical, choices: [0.1, 0.5]}\n")


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """recipe.yaml (dpo, 2 steps, 4 held-out pairs) and space.yaml."""
    root = tmp_path_factory.mktemp("sweep-inputs")
    data = write_jsonl(root / "pairs.jsonl", synthetic_pairs(16))
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"algorithm": "dpo", "model": str(tiny_model_dir), "data": data,
                                      "max_steps": 2, "batch_size": 4, "eval_holdout": 4}))
    space = root / "space.yaml"
    space.write_text(SPACE)
    return recipe, space


def sweep_args(inputs, out, trials=3, *extra):
    recipe, space = inputs
    return ["sweep", "--config", str(recipe), "--space", str(space), "--trials", str(trials),
            "--tune-seeds", "0,1", "--test-seeds", "7,8", "--metric", "eval/loss", "--output", str(out),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """One complete 3-trial sweep (shared by the checks below)."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    assert main(sweep_args(inputs, out)) == 0
    return out


def test_sweep_writes_every_file_and_its_report_matches_the_runs_metrics(finished):
    out = finished
    for name in ("report.html", "report.json", "trials.png", "study.db", "sweep.json", "trials.jsonl"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert [t["index"] for t in report["trials"]] == [0, 1, 2]
    assert report["direction"] == "minimize" and report["tune_seeds"] == [0, 1] and report["test_seeds"] == [7, 8]
    for trial in report["trials"]:
        scores = []
        for seed in (0, 1):
            run = out / "trials" / f"{trial['index']:03d}-seed{seed}"
            assert trial["runs"][str(seed)] == run.relative_to(out).as_posix()
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["seed"] == seed and config["lr"] == trial["values"]["lr"]
            assert config["hparams"]["beta"] == trial["values"]["beta"]
            assert (run / "final" / "model.safetensors").is_file()
            last = [r["eval/loss"] for r in read_metrics(run) if "eval/loss" in r][-1]
            assert trial["scores"][str(seed)] == last
            scores.append(last)
        assert trial["score"] == pytest.approx(sum(scores) / 2, rel=1e-12)
    best = report["best"]
    assert best["index"] == min(report["trials"], key=lambda t: t["score"])["index"]
    assert best["values"] == report["trials"][best["index"]]["values"]
    assert best["tuning_score"] == pytest.approx(report["trials"][best["index"]]["score"], rel=1e-12)
    test_scores = []
    for seed in (7, 8):
        run = out / "test" / f"seed{seed}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["seed"] == seed and config["lr"] == best["values"]["lr"]
        last = [r["eval/loss"] for r in read_metrics(run) if "eval/loss" in r][-1]
        assert best["test_scores"][str(seed)] == last
        test_scores.append(last)
    assert best["test_score"] == pytest.approx(sum(test_scores) / 2, rel=1e-12)
    assert best["test_ci"][0] <= best["test_score"] <= best["test_ci"][1]
    assert best["tuning_ci"][0] <= best["tuning_score"] <= best["tuning_ci"][1]
    assert best["optimism"] == pytest.approx(best["test_score"] - best["tuning_score"])
    page = (out / "report.html").read_text()
    assert f"{best['test_score']:.4g}" in page and f"{best['tuning_score']:.4g}" in page
    assert "data:image/png;base64," in page
    logged = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [row["values"] for row in logged] == [t["values"] for t in report["trials"]]
    assert len({t["values"]["lr"] for t in report["trials"]}) == 3  # the sampler did move


def test_interrupted_sweep_resumes_to_the_same_trials_and_report(inputs, finished, tmp_path, capsys,
                                                                   monkeypatch):
    """Cut during trial 1's second seed, then --resume: trial 1 reruns with the same values and
    trial 2 is sampled as in the uninterrupted sweep (sampler seeded per trial index)."""
    out = tmp_path / "out"
    calls, score_run = [], runner.score_run

    def interrupted(config, settings):
        calls.append(config.output)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return score_run(config, settings)

    monkeypatch.delenv("ALIGNKIT_DEBUG", raising=False)
    monkeypatch.setattr(runner, "score_run", interrupted)
    assert main(sweep_args(inputs, out)) == 130
    assert len((out / "trials.jsonl").read_text().splitlines()) == 1  # trial 0 finished, trial 1 cut
    monkeypatch.setattr(runner, "score_run", score_run)
    assert main(sweep_args(inputs, out, 2)) == 2
    assert "not empty; pass --resume to continue the sweep there" in capsys.readouterr().err
    assert main(sweep_args(inputs, out, 3, "--study-seed", "5", "--resume")) == 2
    assert "settings differ from the interrupted sweep's (study_seed)" in capsys.readouterr().err
    assert main(sweep_args(inputs, out, 3, "--resume")) == 0
    before = json.loads((finished / "report.json").read_text())
    after = json.loads((out / "report.json").read_text())
    assert [t["values"] for t in after["trials"]] == [t["values"] for t in before["trials"]]
    assert [t["scores"] for t in after["trials"]] == [t["scores"] for t in before["trials"]]
    assert after["best"]["test_scores"] == before["best"]["test_scores"]
    import optuna

    study = optuna.load_study(study_name=runner.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_overlapping_seeds_and_bad_space_are_refused_before_anything_runs(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ALIGNKIT_DEBUG", raising=False)
    recipe, _ = inputs
    out = tmp_path / "out"
    args = sweep_args(inputs, out)
    args[args.index("--test-seeds") + 1] = "1,2"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "alignkit sweep: error: --test-seeds must be disjoint from --tune-seeds; both contain [1]" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("betta: {type: float, low: 0.1, high: 0.5}\n")
    args = sweep_args(inputs, out)
    args[args.index("--space") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: key 'betta' = 0.1: dpo: unknown hyper-parameter(s) ['betta']" in err
    bad.write_text("lr: {type: float, low: -1.0, high: 1.0}\n")
    assert main(args) == 2
    assert "bad.yaml: key 'lr' = -1.0: --lr must be > 0" in capsys.readouterr().err
    bad.write_text("lr: {type: uniform, low: 0.1, high: 1.0}\n")
    assert main(args) == 2
    assert "bad.yaml: key 'lr': type must be float, int or categorical" in capsys.readouterr().err
    assert not out.exists()


def test_a_metric_that_is_never_logged_names_the_run(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ALIGNKIT_DEBUG", raising=False)
    args = sweep_args(inputs, tmp_path / "out", 1)
    args[args.index("--metric") + 1] = "reward/mean"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "000-seed0: metric 'reward/mean' is never logged; logged:" in err and "eval/loss" in err


def test_sweep_help_documents_the_space_and_seeds(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--tune-seeds" in out and "--test-seeds" in out and "categorical" in out and "--resume" in out

