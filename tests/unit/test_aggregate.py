"""The mean and spread of a sweep's runs (pipelines.aggregate)."""
from __future__ import annotations

import json
import statistics

import pytest

from pipelines import aggregate


def write_run(root, run_id, accuracy, ppl):
    (root / "runs").mkdir(exist_ok=True)
    steps = [{"name": "evaluate", "out_dir": str(root / "nowhere"),
              "metrics": {"finetuned_accuracy": accuracy, "finetuned_accuracy_low": 0.1, "ppl_finetuned": ppl,
                          "served_mb": 3.0}},
             {"name": "finetune", "out_dir": str(root / "nowhere"), "metrics": {"final_val_accuracy": accuracy / 2,
                                                                              "train_seconds": 9.0}}]
    (root / "runs" / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "steps": steps}))


def test_mean_spread_and_t_interval_of_the_reported_metrics(tmp_path, capsys):
    for run_id, accuracy, ppl in (("a", 0.70, 50.0), ("b", 0.74, 54.0), ("c", 0.78, 49.0)):
        write_run(tmp_path, run_id, accuracy, ppl)
    aggregate.main(["--root", str(tmp_path), "--last", "3", "--json", str(tmp_path / "out.json")])
    table = json.loads((tmp_path / "out.json").read_text())["metrics"]
    assert set(table["evaluate"]) == {"finetuned_accuracy", "ppl_finetuned"}  # no bounds, sizes or timings
    assert set(table["finetune"]) == {"final_val_accuracy"}
    summary = table["evaluate"]["finetuned_accuracy"]
    assert summary["mean"] == pytest.approx(0.74) and summary["sd"] == pytest.approx(0.04)
    half = 4.303 * statistics.stdev([0.70, 0.74, 0.78]) / 3 ** 0.5  # t(0.975, 2 dof)
    assert (summary["ci95_low"], summary["ci95_high"]) == (pytest.approx(0.74 - half), pytest.approx(0.74 + half))
    assert "their configs are the same" in capsys.readouterr().out


def test_fewer_than_two_runs_is_a_clear_error(tmp_path, capsys):
    write_run(tmp_path, "a", 0.7, 50.0)
    with pytest.raises(SystemExit) as stopped:
        aggregate.main(["--root", str(tmp_path)])
    assert stopped.value.code == 2
    assert "1 finished run(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aggregate.main(["--root", str(tmp_path), "a", "zzz"])
    assert "no summary for zzz" in capsys.readouterr().err
