"""Two launches of the same experiment at once on one artifact root: every step runs exactly
once; the other launch waits for it and uses its result."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import REPO


def launch(root):
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}", "ray.num_cpus=2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_launches_run_each_step_once(tmp_path, fault_table):
    first = launch(tmp_path)
    time.sleep(2)
    second = launch(tmp_path)
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
    fault_table("two launches of one experiment at once", "second launch 2 s after the first",
                "both exit 0; each step ran once, the other launch waited and used it", "none", "0")
