"""Two launches of the same experiment at once on one empty artifact root: every step runs exactly
once; the other launch waits for it and uses its result. Both also create the default SQLite MLflow
store at the same moment (created under a lock: tracking.sqlite_creation_lock)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def launch(root):
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}", "ray.num_cpus=2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_launches_run_each_step_once(tmp_path, fault_table):
    first, second = launch(tmp_path), launch(tmp_path)  # the same moment, on an empty root
    outputs = [proc.communicate(timeout=1500)[0] for proc in (first, second)]
    for proc, output in zip((first, second), outputs):
        assert proc.returncode == 0, output[-4000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(summaries) == 2
    ran = {}
    for summary in summaries:
        for step in summary["steps"]:
            ran[step["name"]] = ran.get(step["name"], 0) + (step["status"] == "ran")
    assert ran == dict.fromkeys(("ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune", "evaluate"), 1)
    assert any("finished by another launch meanwhile" in out for out in outputs)
    assert not list(tmp_path.glob("*/.lock-*"))  # every lock released
    fingerprints = [{s["name"]: s["fingerprint"] for s in summary["steps"]} for summary in summaries]
    assert fingerprints[0] == fingerprints[1]
    fault_table("two launches of one experiment at once", "both launched at the same moment on an empty root",
                "both exit 0; each step ran once, the other launch waited and used it", "none", "0")
