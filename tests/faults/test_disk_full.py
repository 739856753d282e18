"""The disk fills during a step: the run stops with a clear error naming the step, nothing
partial is published or taken as a result, and once there is space the rerun redoes only the
unfinished steps. The artifact root (MLflow store included) is a small tmpfs, grown afterwards
with `mount -o remount` (needs root, as on the CI machines; skipped elsewhere)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from pipelines import artifacts
from tests.conftest import REPO

STEPS = ["ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune", "evaluate"]


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def run(root, *overrides):
    return subprocess.run([sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}",
                           "ray.num_cpus=2", *overrides], cwd=REPO, capture_output=True, text=True, timeout=1200)


def published(root) -> dict[str, dict]:
    """Step name -> manifest, for every published result under root."""
    found = {}
    for step in STEPS:
        for directory in (root / step).glob("[!.]*") if (root / step).exists() else []:
            manifest = artifacts.read_manifest(directory)
            assert manifest is not None, f"{directory} has no manifest but is in a result's place"
            assert artifacts.damage(directory, manifest) is None, directory
            found[step] = manifest
    return found


def test_a_full_disk_stops_the_step_cleanly_and_the_rerun_finishes(small_disk, fault_table):
    proc = run(small_disk)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    failed = re.match(r"error: (\w+): no space left on the device of ", line)
    assert failed, proc.stderr[-3000:]
    step = failed.group(1)
    assert "free some space and rerun" in line and "Traceback" not in proc.stderr.split("error:")[-1]
    done = published(small_disk)
    assert step not in done and set(done) < set(STEPS)
    assert not list(small_disk.glob("*/.staging-*"))  # the failed data step left nothing behind

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    proc = run(small_disk)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(open(re.search(r"summary JSON:\s+(\S+)", proc.stdout).group(1)).read())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert {name for name, s in status.items() if s == "cached"} == set(done)
    assert status[step] == "ran" and set(published(small_disk)) == set(STEPS)
    fault_table("disk full (1.2 MB tmpfs as paths.root)", f"ENOSPC during {step}",
                f"exit 1, one line naming {step}; rerun finished", f"{step} (its partial output was discarded)",
                "0 (no partial result published)")
