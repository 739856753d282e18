"""pipelines.status on a fabricated artifact root and fabricated MLflow runs (no Ray, no MLflow)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipelines import artifacts, locks, status
from tasks.common import write_json


@pytest.mark.parametrize("summary,mlflow,tag,published,active,expected", [
    ("ran", "FINISHED", "run", True, False, "done"),
    ("cached", "FINISHED", "cached", True, False, "cached"),
    (None, "FINISHED", "cached", True, False, "cached"),
    (None, "FINISHED", "run", True, False, "done"),
    (None, "RUNNING", "run", False, True, "running"),
    (None, "RUNNING", "run", False, False, "interrupted"),
    (None, "RUNNING", "run", True, False, "done"),  # published, the run's end not yet recorded
    (None, "FAILED", "run", False, False, "failed"),
    (None, "KILLED", "run", False, True, "stopped"),
    (None, None, None, True, False, "done"),
])
def test_step_state(summary, mlflow, tag, published, active, expected):
    assert status.step_state(summary, mlflow, tag, published, active) == expected


def publish(root, step, fingerprint, seconds, node):
    artifacts.step_dir(root, step, fingerprint).mkdir(parents=True)
    write_json(artifacts.step_dir(root, step, fingerprint) / artifacts.MANIFEST,
               {"fingerprint": fingerprint, "seconds": seconds, "placement": {"node_ids": [node]}})


def child(step, fingerprint, state, tag="run", start_s_ago=30.0, end_s_ago=None):
    now = time.time() * 1000
    return {"run_id": f"r-{step}", "name": step, "status": state, "start": now - start_s_ago * 1000,
            "end": None if end_s_ago is None else now - end_s_ago * 1000,
            "tags": {"lmforge.step": step, "lmforge.fingerprint": fingerprint, "lmforge.status": tag}}


@pytest.fixture
def root(tmp_path):
    """A run in progress: ingest cached, tokenize done, pretrain running (fresh lock), taskdata
    failed, finetune left RUNNING by a dead launch (stale lock)."""
    publish(tmp_path, "ingest", "a1", 5.0, "node-head-0000")
    publish(tmp_path, "tokenize", "b2", 7.5, "node-worker-00")
    for step, fingerprint, age in (("pretrain", "c3", 1), ("finetune", "e5", locks.STALE_S + 60)):
        lock = locks.lock_path(tmp_path, step, fingerprint)
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text("{}")
        os.utime(lock, (time.time() - age, time.time() - age))
    return tmp_path


def test_steps_of_a_run_without_summary_come_from_mlflow_and_the_root(root):
    children = [child("ingest", "a1", "FINISHED", "cached", 50, 49), child("tokenize", "b2", "FINISHED", "run", 48, 40),
                child("pretrain", "c3", "RUNNING", "run", 39), child("taskdata", "d4", "FAILED", "run", 20, 10),
                child("finetune", "e5", "RUNNING", "run", 9)]
    rows = {r.name: r for r in status.run_steps(root, None, list(reversed(children)))}
    assert [r.name for r in status.run_steps(root, None, children)] == ["ingest", "tokenize", "pretrain", "taskdata", "finetune"]
    assert {name: r.state for name, r in rows.items()} == {
        "ingest": "cached", "tokenize": "done", "pretrain": "running", "taskdata": "failed", "finetune": "interrupted"}
    assert rows["tokenize"].seconds == 7.5 and rows["tokenize"].node_ids == ["node-worker-00"]
    assert rows["taskdata"].seconds == pytest.approx(10, abs=1)
    assert rows["pretrain"].seconds == pytest.approx(39, abs=5)
    assert rows["pretrain"].out_dir == root / "pretrain" / "c3"


def test_a_finished_run_is_read_from_its_summary(root, tmp_path, capsys, monkeypatch):
    summary = {"run_id": "run1", "experiment": "tiny", "root": str(root), "steps": [
        {"name": "ingest", "status": "cached", "seconds": 5.0, "fingerprint": "a1"},
        {"name": "tokenize", "status": "ran", "seconds": 7.5, "fingerprint": "b2"}]}
    (root / "runs").mkdir()
    write_json(root / "runs" / "run1.json", summary)
    rows = status.run_steps(root, {**summary, "written_at": 0}, [])
    assert [(r.name, r.state, r.seconds) for r in rows] == [("ingest", "cached", 5.0), ("tokenize", "done", 7.5)]

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # no store under the root: the root alone
    assert status.main(["--root", str(root)]) == 0
    assert "run1" in capsys.readouterr().out
    assert status.main(["--root", str(root), "run1"]) == 0
    out = capsys.readouterr().out
    assert "run run1 (tiny): finished" in out and "node-wor" in out and str(root / "tokenize" / "b2") in out
    assert status.main(["--root", str(root), "nope"]) == 2
    assert not (root / "mlflow.db").exists()


def live_marker(root, run_id, pid, age_s=1.0):
    path = locks.lock_path(root, "runs", run_id, kind="live")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": time.time()}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("marker,remote,expected", [
    ("alive", False, "running"),
    ("dead holder", False, "interrupted"),  # SIGKILLed: seen at once, not after the heartbeat goes stale
    ("stale", False, "interrupted"),  # a launch on another machine that stopped beating
    (None, False, "interrupted"),
    (None, True, "running"),  # a URI root: the marker is on the launching machine
])
def test_a_run_mlflow_calls_running_is_running_only_while_its_launch_holds_the_live_marker(
        tmp_path, marker, remote, expected):
    pid = {"alive": os.getpid(), "dead holder": dead_pid(), "stale": os.getpid()}.get(marker)
    if marker:
        live_marker(tmp_path, "run1", pid, age_s=locks.STALE_S + 5 if marker == "stale" else 1.0)
    parent = {"run_id": "run1", "status": "RUNNING", "tags": {}}
    assert status.run_state(tmp_path, parent, remote_root=remote) == expected
    assert status.run_state(tmp_path, {**parent, "status": "FAILED"}, remote_root=remote) == "failed"


def test_a_failed_step_shows_its_error_line_and_a_missing_root_is_an_error(root, tmp_path, capsys):
    failed = child("taskdata", "d4", "FAILED", "run", 20, 10)
    failed["tags"]["lmforge.error"] = "task.train_path: no such file /data/train.csv"
    rows = status.run_steps(root, None, [failed])
    status.print_steps(rows)
    assert "error: task.train_path: no such file /data/train.csv" in capsys.readouterr().out

    assert status.main(["--root", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder of runs" in capsys.readouterr().err
