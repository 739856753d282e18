"""Real process kills during a pipeline run: the driver (SIGTERM, as a preemption does) and a Ray
Train worker (SIGKILL, restarted by Ray Train); SIGKILLs of the driver are in
tests/faults/test_random_kills.py. Training continues from its
last checkpoint either way, also on a different number of workers."""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO, copy_upstream

LONG_PRETRAIN = ["until=pretrain", "pretrain.max_steps=150", "pretrain.checkpoint_every=10", "pretrain.log_every=5",
                 "pretrain.eval_every=150"]


def start(root, *overrides, workers: int = 1):
    """A launch in its own process group, as a shell runs a command: Ctrl-C there signals the whole group."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}", "ray.num_cpus=2",
         *LONG_PRETRAIN, f"pretrain.num_workers={workers}", f"pretrain.cpus_per_worker={2 // workers}", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def pretrain_step_reached(root) -> int:
    logs = list((root / "pretrain").glob(".partial-*/train_log.jsonl")) if (root / "pretrain").exists() else []
    try:
        return max(json.loads(line)["step"] for line in logs[0].read_text().splitlines()) if logs else 0
    except (OSError, ValueError):
        return 0


def wait_for_step(root, proc, step: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while pretrain_step_reached(root) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return pretrain_step_reached(root)


def finish(proc) -> str:
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, output[-4000:]
    return output


def test_killed_train_worker_is_restarted_by_ray_train(tmp_path, fault_table, tiny_upstream):
    copy_upstream(tiny_upstream, tmp_path)  # ingest and tokenize cached
    proc = start(tmp_path, "pretrain.max_failures=1")
    reached = wait_for_step(tmp_path, proc, 25)
    assert reached < 150
    # this run's workers only (descendants of its driver), not those of anything else on the machine
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert workers, "no Ray Train worker process of this run found to kill"
    for worker in workers:
        worker.kill()
    output = finish(proc)
    assert "resumed from the checkpoint at step" in output
    assert "summary JSON" in output
    resumed = int(output.split("resumed from the checkpoint at step ")[1].split("/")[0])
    fault_table("Ray Train worker killed mid-pretraining", f"SIGKILL of a RayTrainWorker at step {reached}",
                "Ray Train restarted the worker group; the same run finished",
                f"pretrain steps after the checkpoint at step {resumed}", "0")


@pytest.mark.parametrize("storage,stop", [("shared", "Ctrl-C"), ("object_store", "SIGTERM")])
def test_a_stop_signal_checkpoints_and_the_rerun_continues_on_another_worker_count(tmp_path, fault_table, storage, stop,
                                                                                   tiny_upstream):
    """Ctrl-C: SIGINT to the launch's whole process group, as a terminal sends it; SIGTERM: to the
    driver, as a preemption does; both take one path. object_store: paths.root is a file:// store,
    and the rerun has a fresh working copy (another machine): the stop request reaches the workers
    through the store, and the checkpoint is taken from it."""
    root, rerun_root, overrides = tmp_path, tmp_path, []
    if storage == "object_store":
        root, rerun_root = tmp_path / "cache-1", tmp_path / "cache-2"
        overrides = [f"paths.cache={root}"]
    else:
        copy_upstream(tiny_upstream, tmp_path)  # ingest and tokenize cached
    uri = f"file://{tmp_path / 'store'}" if storage == "object_store" else str(tmp_path)
    proc = start(uri, *overrides, workers=2)
    reached = wait_for_step(root, proc, 25)
    assert 25 <= reached < 150, f"not stopped mid-pretraining (step {reached})"
    if storage == "shared":
        assert_loopback_only(proc.pid)
    signalled = time.monotonic()
    if stop == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    name, code = ("SIGINT", 130) if stop == "Ctrl-C" else ("SIGTERM", 143)
    assert proc.returncode == code, output[-4000:]
    assert time.monotonic() - signalled < 90, "the stop took too long"
    stopped_at = int(output.split("pretrain checkpointed at step ")[1].split(";")[0])
    assert reached <= stopped_at < 150
    assert f"stopped by {name}" in output and "rerun the same command to continue" in output
    if storage == "shared":  # pipelines.status: the run and its step stopped, with the reason
        shown = status_of(root)
        assert re.search(r"run \w+ \(tiny\): killed", shown) and re.search(r"pretrain\s+stopped", shown), shown
        assert f"error: stopped by {name}: pretrain checkpointed at step {stopped_at}" in shown, shown

    output = finish(start(uri, *([f"paths.cache={rerun_root}"] if storage == "object_store" else []), workers=1))
    assert "written by 2 worker(s), resuming on 1" in output
    assert f"resumed from the checkpoint at step {stopped_at}/150" in output
    assert "summary JSON" in output
    where = " (object-store root, rerun from a fresh working copy)" if storage == "object_store" else ""
    fault = f"{stop} (SIGINT to the process group)" if stop == "Ctrl-C" else "SIGTERM (preemption)"
    fault_table(f"{fault} of a 2-worker run, rerun on 1 worker{where}", f"{name} at step {reached}",
                f"checkpoint at step {stopped_at}, exit {code}; rerun resumed there (universal checkpoint)",
                "none (stopped at a step boundary)", "0")


def assert_loopback_only(pid: int) -> None:
    """Every listening socket of a run (the driver and the embedded Ray's processes: GCS, raylet,
    agents, actors, Ray Train workers) is on loopback, but for the one that torch.distributed cannot
    place: the TCPStore through which a training step's workers meet, opened by rank 0 on all interfaces."""
    wildcard, elsewhere = [], []
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in process.net_connections(kind="inet"):
                if conn.status != psutil.CONN_LISTEN:
                    continue
                address = ipaddress.ip_address(conn.laddr.ip)
                address = getattr(address, "ipv4_mapped", None) or address
                if address.is_unspecified:
                    wildcard.append((process.name(), conn.laddr))
                elif not address.is_loopback:
                    elsewhere.append((process.name(), conn.laddr))
    assert not elsewhere, elsewhere
    assert len(wildcard) <= 1 and all(name == "ray::RayTrainWorker" for name, _ in wildcard), wildcard


def status_of(root) -> str:
    """`pipelines.status` for the newest run under root: the listing, then that run's steps."""
    listing = subprocess.run([sys.executable, "-m", "pipelines.status", "--root", str(root)], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    run_id = listing.splitlines()[1].split()[0]
    detail = subprocess.run([sys.executable, "-m", "pipelines.status", "--root", str(root), run_id], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return listing + detail
