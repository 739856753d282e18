"""The driver of a pipeline run (its whole process group: Ray and its workers too) killed with
SIGKILL in the middle of the ingest step, once some work units are finished: the rerun says how
far the killed attempt got, reuses its finished units, computes only the others, and publishes
the same bytes as an uninterrupted run in one process (one worker, no Ray) with another unit size."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil

from pipelines import artifacts, dag
from tasks import ingest, units
from tasks.common import TaskContext
from tests.conftest import REPO, compose_config

# Near-dedup with 4,096 permutations makes each byte dear: ingest takes this corpus about 10 s on 2 quiet
# CPUs (20 s on a loaded machine), in about 60 work units.
CORPUS_MB = 12
OVERRIDES = ["+experiment=tiny", "data=files", "data.max_bytes=0", "data.near_dedup.enabled=true",
             "data.near_dedup.num_perm=4096", "data.near_dedup.bands=512"]


def write_corpus(directory: Path) -> None:
    """JSONL files of standard-library text in windows of 3-9 KB (few documents: few signatures to
    hold), 3% of them copies of an earlier one: two files of 3 MB (split into byte ranges), the rest
    of 150 KB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join(p.read_text(errors="replace") for p in sorted(root.glob("*.py")))
    directory.mkdir()
    rng, written = random.Random(0), 0
    for index in range(10**6):
        lines, size = [], 0
        while size < (3_000_000 if index < 2 else 150_000):
            start, length = rng.randrange(len(text) - 9000), rng.choice((3000, 6000, 9000))
            copy = lines and rng.random() < 0.03
            lines.append(rng.choice(lines) if copy else json.dumps({"text": text[start : start + length]}))
            size += len(lines[-1]) + 1
        (directory / f"part-{index:03d}.jsonl").write_text("\n".join(lines) + "\n")
        written += size
        if written >= CORPUS_MB * 1e6:
            return


def launch(root: Path, corpus: Path, log: Path, *overrides: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipelines.run", f"paths.root={root}",
                                 f"data.paths=[{corpus}]", *OVERRIDES, *overrides],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill the run"
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the run's process group and to every process it started (Ray's, which could have
    left the group), then wait until they are gone."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"processes of the killed run survive: {alive}"


def finished_units(root: Path) -> int:
    return len(list(root.glob(f"ingest/.partial-*/{units.UNITS_DIR}/*/{units.RECORD}")))


def published(root: Path) -> Path | None:
    return next((d for d in (root / "ingest").glob("[!.]*") if (d / artifacts.MANIFEST).is_file()), None)


def work_dirs(root: Path) -> list[Path]:
    return list(root.glob("ingest/.partial-*"))


def run_until_ingest_is_published(root: Path, corpus: Path, log: Path, *overrides: str) -> Path:
    proc = launch(root, corpus, log, *overrides)
    try:
        wait_for(lambda: published(root) is not None and not work_dirs(root), proc)
    finally:
        kill_group(proc)  # the later steps are not what this test is about
    return published(root)


def step_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != artifacts.MANIFEST}


def result_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("units_")}


def uninterrupted(root: Path, corpus: Path) -> tuple[str, dict]:
    """The ingest step of the same config run whole in this process (serial map): its fingerprint
    and metrics; its files under root/reference."""
    cfg = compose_config([f"paths.root={root}", f"data.paths=[{corpus}]", *OVERRIDES])
    (root / "reference").mkdir(parents=True)
    metrics = ingest.run(cfg.data, {}, root / "reference", TaskContext("ingest"))
    return next(p.fingerprint for p in dag.plan(cfg, root) if p.step.name == "ingest"), metrics


def test_sigkill_mid_ingest_reuses_finished_units(tmp_path, fault_table):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    fingerprint, expected = uninterrupted(tmp_path / "uninterrupted", corpus)

    root, small_units = tmp_path / "killed", "data.shard_bytes=300000"
    proc = launch(root, corpus, tmp_path / "killed.log", "ray.num_cpus=2", small_units)
    wait_for(lambda: finished_units(root) >= 8, proc)
    kill_group(proc)
    done = finished_units(root)
    assert published(root) is None and work_dirs(root)

    resumed = run_until_ingest_is_published(root, corpus, tmp_path / "rerun.log", "ray.num_cpus=2", small_units)
    output = (tmp_path / "rerun.log").read_text()
    plan = re.search(r"ingest\s+run\s+(\w+)\s+an earlier attempt stopped; (\d+) of (\d+) work units done, continuing",
                     output)
    assert plan, output[-3000:]
    metrics = artifacts.read_manifest(resumed)["metrics"]
    assert int(plan.group(2)) == done == metrics["units_reused"] and int(plan.group(3)) == metrics["units_total"]
    assert done < metrics["units_total"] and metrics["units_total"] != expected["units_total"]
    assert f"{done} of {metrics['units_total']} work units were finished by an earlier attempt" in output

    assert resumed.name == fingerprint == plan.group(1)
    assert step_files(resumed) == step_files(tmp_path / "uninterrupted" / "reference")
    assert result_metrics(metrics) == result_metrics(expected)
    fault_table("driver SIGKILL mid-ingest (whole process group, Ray included)",
                f"SIGKILL with {done} of {metrics['units_total']} work units finished",
                f"rerun reused {done} units; output byte-identical to an uninterrupted one-worker run "
                f"with {expected['units_total']} units", f"{metrics['units_total'] - done} work units", "0")
