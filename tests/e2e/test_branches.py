"""One pretrained model, several fine-tuning methods: the DAG branches and one table compares
them, with the issue-8 techniques switched on (tiny_techniques: regularisation, FGM, augmentation,
early stopping, robustness, int8 + pruning, an ensemble step); a Hydra multirun sweep shares the
upstream steps (they run once: both start from the tiny experiment's pretraining, run once for
the test session)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, UPSTREAM, copy_upstream
from tests.e2e.test_pipeline import mlflow_client, statuses


def pipeline(root, experiment, *overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run", f"+experiment={experiment}", f"paths.root={root}", "ray.num_cpus=2",
         *overrides], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    found = re.search(r"summary JSON:\s+(\S+)", proc.stdout)
    return proc, json.loads(Path(found.group(1)).read_text()) if found else None


def test_branches_share_pretraining_and_are_compared_in_one_table(tmp_path, tiny_upstream):
    copy_upstream(tiny_upstream, tmp_path)  # the tiny experiment's: the branches share them
    proc, summary = pipeline(tmp_path, "tiny_techniques")
    assert statuses(summary) == {name: "cached" if name in UPSTREAM else "ran" for name in (
        "ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune.lora", "evaluate.lora",
        "finetune.full", "evaluate.full", "ensemble")}
    table = proc.stdout.split("fine-tuning branches against the baselines")[1]
    for row in ("majority", "untuned", "lora", "full"):
        assert f"\n  {row} " in table
    steps = {s["name"]: s for s in summary["steps"]}
    lora_dir, full_dir = Path(steps["finetune.lora"]["out_dir"]), Path(steps["finetune.full"]["out_dir"])
    assert lora_dir.parent == full_dir.parent == tmp_path / "finetune"
    assert (lora_dir / "merged" / "model.safetensors").exists()
    assert (full_dir / "model" / "model.safetensors").exists()
    assert steps["finetune.full"]["metrics"]["trainable_parameters"] > steps["finetune.lora"]["metrics"]["trainable_parameters"]

    client = mlflow_client(tmp_path)
    parent = client.get_run(summary["run_id"])
    assert {"lora.finetuned_accuracy", "full.finetuned_accuracy"} <= set(parent.data.metrics)

    techniques_were_applied(steps)

    _, again = pipeline(tmp_path, "tiny_techniques")
    assert set(statuses(again).values()) == {"cached"}
    plan = pipeline(tmp_path, "tiny", "dry_run=true")[0].stdout  # the single-method experiment shares them
    for name in ("ingest", "tokenize", "pretrain", "taskdata", "decontaminate"):
        assert re.search(rf"\n  {name}\s+cached ", plan), plan


def techniques_were_applied(steps: dict) -> None:
    """What each switched-on technique leaves in the metrics of a real run."""
    tuned, judged = steps["finetune.lora"]["metrics"], steps["evaluate.lora"]["metrics"]
    assert tuned["augmented_examples"] > 0 and 0 < tuned["best_step"] <= tuned["last_step"]
    for perturbation in ("typos", "casing", "deleted_words"):
        assert 0 <= judged[f"robust_{perturbation}_accuracy"] <= 1
    assert 0 < judged["int8_mb"] < judged["served_mb"] and judged["int8_tokens_per_s"] > 0
    assert judged["int8_accuracy_delta"] == judged["int8_accuracy"] - judged["finetuned_accuracy"]
    ensemble = steps["ensemble"]["metrics"]
    assert ensemble["lora_accuracy"] == judged["finetuned_accuracy"]
    assert ensemble["full_accuracy"] == steps["evaluate.full"]["metrics"]["finetuned_accuracy"]
    assert 0 <= ensemble["ensemble_accuracy"] <= 1


def test_multirun_sweep_runs_upstream_steps_once(tmp_path, tiny_upstream):
    copy_upstream(tiny_upstream, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "-m", "+experiment=tiny", f"paths.root={tmp_path}", "ray.num_cpus=2",
         "finetune.seed=0,1"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*.json"))]
    assert len(summaries) == 2
    ran = {}
    for summary in summaries:
        for name, status in statuses(summary).items():
            ran[name] = ran.get(name, 0) + (status == "ran")
    assert ran == {"ingest": 0, "tokenize": 0, "pretrain": 0, "taskdata": 1, "decontaminate": 1, "finetune": 2,
                   "evaluate": 2}
    runs = {s["run_id"] for s in summaries}
    assert len(runs) == 2  # one MLflow parent run per sweep value
    params = [mlflow_client(tmp_path).get_run(r).data.params["finetune.seed"] for r in runs]
    assert sorted(params) == ["0", "1"]
    # the seed sweep's mean and spread, and what the runs differ in
    report = subprocess.run([sys.executable, "-m", "pipelines.aggregate", "--root", str(tmp_path), "--last", "2",
                             "--json", str(tmp_path / "aggregate.json")], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    assert "they differ in: finetune.seed = 0, 1" in report.stdout
    accuracies = [next(s for s in summary["steps"] if s["name"] == "evaluate")["metrics"]["finetuned_accuracy"]
                  for summary in summaries]
    aggregated = json.loads((tmp_path / "aggregate.json").read_text())["metrics"]["evaluate"]["finetuned_accuracy"]
    assert aggregated["n"] == 2 and aggregated["mean"] == pytest.approx(sum(accuracies) / 2)
    assert (aggregated["min"], aggregated["max"]) == (min(accuracies), max(accuracies))
