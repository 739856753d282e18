"""pipelines.gc on a fabricated artifact root (no Ray): what it lists and why, what --delete
removes, and what it never touches."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipelines import artifacts, gc, locks
from tasks import units
from tasks.common import write_json

PUBLISHED, TRAINING, INGESTING, UNFINISHED, RUNNING, EXITED, SILENT = (f"{n:016x}" for n in range(1, 8))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lock(path, pid, age_s=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": time.time()}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def put(path, text="x" * 1000):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ingest_work_dir(path):
    """An ingest attempt that finished one of its two work units."""
    put(path / units.PLAN, json.dumps({"units": ["u0", "u1"]}))
    put(path / units.UNITS_DIR / "u0" / units.RECORD, "{}")
    return path


@pytest.fixture
def root(tmp_path):
    """Every kind of leftover, next to what gc must keep: returns (root, garbage, kept) paths."""
    r = tmp_path
    published = lambda step, fp: write_json(put(r / step / fp / "model.bin").parent / artifacts.MANIFEST, {"step": step})
    for step in ("tokenize", "pretrain", "finetune"):
        published(step, PUBLISHED)
    garbage = {
        "staging directory of an attempt that did not finish": put(r / "tokenize" / f".staging-{UNFINISHED}-0a1b2c3d" / "a").parent,
        "working directory of a step published since": put(r / "pretrain" / f".partial-{PUBLISHED}" / "checkpoints" / "latest").parent.parent,
        "no _manifest.json: an attempt that never finished": put(r / "tokenize" / UNFINISHED / "train.bin").parent,
        "Ray Train's directory of an attempt that ended": put(r / ".ray_train" / f"pretrain-{PUBLISHED}-abc123" / ".validate_storage_marker").parent,
        "which has exited": lock(r / "taskdata" / f".lock-{EXITED}", dead_pid()),
        "no heartbeat for": lock(r / "taskdata" / f".node-{SILENT}", os.getpid(), age_s=locks.STALE_S + 30),
        "a lock moved aside": put(r / "taskdata" / f".lock-{SILENT}.stale-0a1b2c3d"),
        "run marker of pid": lock(r / "runs" / ".live-run1", dead_pid()),
    }
    kept = {
        "kept: checkpoints a rerun of the same config resumes from": put(r / "finetune" / f".partial-{TRAINING}" / "checkpoints" / "latest").parent.parent,
        "kept: finished work units a rerun of the same config reuses": ingest_work_dir(r / "ingest" / f".partial-{INGESTING}"),
        "is running this step": put(r / "finetune" / f".partial-{RUNNING}" / "checkpoints" / "latest").parent.parent,
    }
    untouched = [lock(r / "finetune" / f".lock-{RUNNING}", os.getpid()),  # a live launch's: held, fresh heartbeat
                 put(r / "finetune" / f".staging-{RUNNING}-0a1b2c3d" / "a").parent,
                 put(r / "finetune" / RUNNING / "model.bin").parent,
                 put(r / ".ray_train" / f"finetune.lora-{RUNNING}-def456" / ".validate_storage_marker").parent,
                 lock(r / "runs" / ".live-run2", os.getpid()),
                 *(r / step / PUBLISHED for step in ("tokenize", "pretrain", "finetune")),
                 put(r / "runs" / "run1.json"), put(r / "mlflow.db"), put(r / "hydra" / "12-00-00" / ".hydra" / "config.yaml"),
                 put(r / "mlartifacts" / "1" / UNFINISHED / "artifacts" / "a.json")]
    return r, garbage, kept, untouched


def listed(out: str, path, root) -> str:
    """The line of gc's listing about a path."""
    return next(line for line in out.splitlines() if f" {path.relative_to(root)} " in line)


def test_a_dry_run_lists_each_leftover_with_its_reason_and_removes_nothing(root, capsys):
    r, garbage, kept, untouched = root
    assert gc.main(["--root", str(r)]) == 0
    out = capsys.readouterr().out
    for reason, path in garbage.items():
        assert listed(out, path, r).startswith("remove") and reason in listed(out, path, r)
    for reason, path in kept.items():
        assert listed(out, path, r).startswith("keep") and reason in listed(out, path, r)
    assert out.splitlines()[-1].startswith(f"{len(garbage)} items, ")
    assert out.splitlines()[-1].endswith("MB: rerun with --delete to remove them")
    assert all(p.exists() for p in [*garbage.values(), *kept.values(), *untouched])


def test_delete_removes_the_leftovers_only(root, capsys):
    r, garbage, kept, untouched = root
    assert gc.main(["--root", str(r), "--delete"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"removed {len(garbage)} items, ")
    assert not [p for p in garbage.values() if p.exists()]
    assert all(p.exists() for p in [*kept.values(), *untouched])
    assert (r / "finetune" / PUBLISHED / artifacts.MANIFEST).exists()
    assert gc.main(["--root", str(r)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"nothing to remove under {r}"


def test_a_launch_that_takes_the_lock_meanwhile_keeps_its_files(root):
    r, garbage, _, _ = root
    found = [item for item in gc.find(r) if item.path == garbage["staging directory of an attempt that did not finish"]]
    lock(r / "tokenize" / f".lock-{UNFINISHED}", os.getpid())
    assert found and not gc.remove(found[0]) and found[0].path.exists()


def test_older_than_keeps_recent_leftovers(root, capsys):
    r, garbage, _, _ = root
    assert gc.main(["--root", str(r), "--older-than", "1", "--delete"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"nothing to remove under {r}"
    assert all(p.exists() for p in garbage.values())


def test_a_missing_root_is_an_error(tmp_path, capsys):
    assert gc.main(["--root", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder of runs" in capsys.readouterr().err


def test_published_training_step_removes_its_ray_train_attempts(tmp_path):
    for name in (artifacts.train_run_name("finetune.lora", PUBLISHED), artifacts.train_run_name("finetune", PUBLISHED),
                 artifacts.train_run_name("finetune", TRAINING), artifacts.train_run_name("pretrain", PUBLISHED)):
        put(tmp_path / artifacts.TRAIN_RUNS / name / ".validate_storage_marker")
    artifacts.remove_train_runs(tmp_path, "finetune", PUBLISHED)
    left = sorted(artifacts.train_run_step(d.name) for d in (tmp_path / artifacts.TRAIN_RUNS).iterdir())
    assert left == [("finetune", TRAINING), ("pretrain", PUBLISHED)]
