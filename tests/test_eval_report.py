"""write_report: file names, the methods table in the HTML, curves from metrics.jsonl."""

import json

from alignkit.eval.report import curve_from_metrics, validation_from_metrics, write_report


def _method(reward, kl=None, curve=None):
    return {
        "gold_reward": reward,
        "ci_low": reward - 0.1,
        "ci_high": reward + 0.1,
        "kl": kl,
        "mean_length_words": 30.0,
        "win_rate": None if kl is None else 0.7,
        "lc_win_rate": None if kl is None else 0.65,
        "diversity": {"per_input": {"ead": 0.8, "embedding": 0.4}, "across_input": {"ead": 0.9}},
        "samples": [
            {"prompt": "Review <Heat>", "completion": f"reply {reward} & more", "reward": reward},
            {"prompt": "Review Up", "completion": "ok", "reward": 0.0},
        ],
        **({"curve": curve} if curve else {}),
    }


def test_write_report_files_table_and_samples(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "\n".join(
            json.dumps({"step": s, "loss": 1.0, "kl": 0.1 * s, "reward/mean": 0.2 * s})
            for s in (1, 2, 3)
        )
    )
    results = {
        "title": "Demo report",
        "task": "movie reviews, gold = VADER",
        "methods": {
            "base": _method(0.1),
            "grpo": _method(0.5, kl=2.0, curve=curve_from_metrics(metrics)),
            "dpo": _method(0.4, kl=1.5, curve=[{"step": 1, "kl": None, "reward": 0.3}]),
        },
        "notes": ["seeds fixed"],
        "extra": float("nan"),
    }
    paths = write_report(results, tmp_path / "out", samples=2)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["report.html", "results.json", "reward_bars.png", "reward_vs_kl.png"]
    page = paths["html"].read_text()
    assert '<table class="methods">' in page and "gold reward [95% CI]" in page
    for name in ("base", "grpo", "dpo"):
        assert f"<td>{name}</td>" in page
    assert "+0.500 [+0.400, +0.600]" in page and "0.700 (LC 0.650)" in page
    assert "Review &lt;Heat&gt;" in page and "reply 0.4 &amp; more" in page  # escaped, side by side
    assert page.count("data:image/png;base64,") == 2
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["extra"] is None and saved["methods"]["grpo"]["curve"][2] == {
        "step": 3,
        "kl": 0.30000000000000004,
        "reward": 0.6000000000000001,
        "metric": "reward/mean",
    }
    for png in ("reward_bars.png", "reward_vs_kl.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_write_report_with_demo_shaped_methods_and_no_curves(tmp_path):
    demo = {
        "methods": {
            "base": {
                "gold_reward": 0.1,
                "ci_low": 0.0,
                "ci_high": 0.2,
                "mean_length_words": 20.0,
                "n": 8,
                "samples": [],
            },
            "dpo": {"gold_reward": 0.3, "ci_low": 0.2, "ci_high": 0.4},
        }
    }
    paths = write_report(demo, tmp_path)
    assert [p.name for p in paths["plots"]] == ["reward_bars.png"]
    assert "no samples given" in paths["html"].read_text()


def test_validation_curves_from_an_online_run_with_eval_rows(tmp_path):
    """An online run's metrics.jsonl with --eval-data rows (step 0 alone, later joined to the
    training rows): validation_from_metrics keeps step, eval/* and reward/mean; the report draws
    validation.png (train reward/mean beside eval/reward and eval/gold) and explains it."""
    rows = [{"step": 0, "eval/reward": 0.1, "eval/gold": 0.2, "eval/pass@1": 0.2, "eval/kl": 0.0}]
    rows += [{"step": s, "loss": 0.5, "kl": 0.1 * s, "reward/mean": 0.3 * s} for s in (1, 2, 3)]
    rows[-1].update({"eval/reward": 0.9, "eval/gold": 0.1, "eval/pass@1": 0.1, "eval/pass@4": 0.3, "eval/kl": 0.4})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows))
    validation = validation_from_metrics(metrics)
    assert [p["step"] for p in validation] == [0, 1, 2, 3]
    assert validation[0] == {"step": 0, "eval/reward": 0.1, "eval/gold": 0.2, "eval/pass@1": 0.2, "eval/kl": 0.0}
    assert validation[1] == {"step": 1, "reward/mean": 0.3} and "loss" not in validation[3]
    assert [p["step"] for p in curve_from_metrics(metrics)] == [1, 2, 3]  # the eval-only row has no reward/mean
    results = {"methods": {"grpo": _method(0.5, kl=0.4, curve=curve_from_metrics(metrics)) | {"validation": validation},
                           "base": _method(0.1)}}
    paths = write_report(results, tmp_path / "out")
    assert [p.name for p in paths["plots"]] == ["reward_bars.png", "reward_vs_kl.png", "validation.png"]
    assert (tmp_path / "out" / "validation.png").stat().st_size > 10_000
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3 and "over-optimisation" in page
    without = write_report({"methods": {"grpo": _method(0.5) | {"validation": validation[1:3]}}}, tmp_path / "no")
    assert "validation.png" not in [p.name for p in without["plots"]]  # no eval/* rows: no figure
