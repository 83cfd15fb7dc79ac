"""examples/online_vs_offline: run.py --dry-run on the tiny model end to end: both methods train
on the same budget, every policy is measured the same way, and the report holds every number."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "online_vs_offline" / "run.py"


def test_dry_run_writes_the_same_budget_report(tmp_path):
    spec = importlib.util.spec_from_file_location("online_vs_offline_under_test", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--dry-run", "--output", str(tmp_path / "out")])
    assert results["budget"] == {"updates": 2, "pairs_per_update": 2, "samples_per_pair": 4}
    assert list(results["policies"]) == ["initial", "offline dpo", "online dpo"]
    for name in ("offline dpo", "online dpo"):
        run = tmp_path / "out" / name.replace(" ", "_")
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]  # the same number of updates
        accuracy, low, high = results["policies"][name]["classification"]
        assert 0.0 <= low <= accuracy <= high <= 1.0
    assert results["policies"]["initial"]["kl"] == 0.0 and "classification" not in results["policies"]["initial"]
    pairs = (tmp_path / "out" / "pairs_train.jsonl").read_text().splitlines()
    assert 1 <= len(pairs) <= 4  # at most one pair per training prompt (ties are skipped)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["policies"]["online dpo"]["gold_reward"] == list(results["policies"]["online dpo"]["gold_reward"])
    assert "online dpo" in (tmp_path / "out" / "report.md").read_text()
