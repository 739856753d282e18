"""A real multi-node Ray cluster on this machine: a head node and a worker node, each started with
`ray start` (its own raylet, object store and dashboard agent), token authentication on. The tiny
experiment is submitted through the Jobs API (`python -m pipelines.submit`): it completes, its
steps ran on both nodes (node ids in the manifests), `pipelines.status` reports it, and a
resubmission is all cached.

The head gets 1 CPU and the worker node 2, so the two-worker training steps cannot all fit on the
head. Every process `ray start` launched is killed at the end (not `ray stop`, which would also stop
other Ray instances on the machine).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipelines import artifacts
from tests.conftest import REPO
from tests.integration.test_resume import free_port

STEPS = ["ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune", "evaluate"]
RAY = str(Path(sys.executable).parent / "ray")



def ray_env() -> dict:
    # The job's entrypoint runs `python`: this interpreter's, through the nodes' PATH.
    return {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "RAY_USAGE_STATS_ENABLED": "0"}


def start_node(args: list[str], temp_dir: str, log: Path, cache: Path) -> subprocess.Popen:
    # A short temp dir of its own per node: Unix socket paths are limited to 107 characters, and
    # two nodes sharing one would each forward the other's worker logs (every line twice).
    # `cache`: the node's own working copy when paths.root is a URI (as a pod's local disk would be).
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", *args],
                            env={**ray_env(), "LMFORGE_CACHE": str(cache)}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL the `ray start` process and everything it started (a graceful stop drains for 30 s)."""
    try:
        family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        family = []
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def alive_node_ids(gcs: str) -> list[str]:
    out = subprocess.run([RAY, "status", f"--address={gcs}"], env=ray_env(), capture_output=True, text=True,
                         timeout=60).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return re.findall(r"node_([0-9a-f]{56})", active)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    gcs_port, dashboard_port = free_port(), free_port()
    gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    temp_dirs = [tempfile.mkdtemp(prefix="lmr", dir="/tmp") for _ in range(2)]
    caches = [tmp_path_factory.mktemp(f"cache-{name}") for name in ("head", "worker")]
    nodes = []
    try:
        nodes.append(start_node(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=1",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                                 f"--ray-client-server-port={free_port()}",
                                 f"--dashboard-agent-listen-port={free_port()}"], temp_dirs[0], logs / "head.log",
                                caches[0]))
        nodes.append(start_node([f"--address={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                                 f"--dashboard-agent-listen-port={free_port()}"], temp_dirs[1], logs / "worker.log",
                                caches[1]))
        deadline = time.monotonic() + 120
        while len(alive_node_ids(gcs)) < 2:
            assert time.monotonic() < deadline, (logs / "head.log").read_text()[-3000:] + (logs / "worker.log").read_text()[-3000:]
            assert all(n.poll() is None for n in nodes), "a `ray start` exited early"
            time.sleep(2)
        yield {"gcs": gcs, "dashboard": dashboard, "root": tmp_path_factory.mktemp("cluster-runs"), "caches": caches,
               "store": tmp_path_factory.mktemp("cluster-store")}
    finally:
        for node in reversed(nodes):
            kill_node(node)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster, *overrides, expect=0, root=None):
    proc = subprocess.run([sys.executable, "-m", "pipelines.submit", "+experiment=tiny",
                           f"paths.root={root or cluster['root']}", *overrides], cwd=REPO, env={**ray_env(), "RAY_ADDRESS": cluster["dashboard"]},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    found = re.search(r"summary JSON:\s+(\S+)", proc.stdout)
    return proc, json.loads(Path(found.group(1)).read_text()) if found else None


@pytest.fixture(scope="module")
def first_job(cluster):
    return submit(cluster)


def test_submitted_job_completes_with_work_on_both_nodes(cluster, first_job):
    proc, summary = first_job
    assert re.search(r"submitted job (\S+)", proc.stdout) and re.search(r"job \S+: SUCCEEDED", proc.stdout)
    assert proc.stdout.count("[evaluate] task (") == 1  # a worker's line reaches the logs once
    assert {s["name"]: s["status"] for s in summary["steps"]} == {name: "ran" for name in STEPS}
    placed = {}
    for step in summary["steps"]:
        manifest = artifacts.read_manifest(Path(step["out_dir"]))
        placed[step["name"]] = manifest["placement"]["node_ids"]
        assert manifest["code_version"] != "unknown"  # the job's copy has no .git: the submitter's version
    used = {node for nodes in placed.values() for node in nodes}
    assert len(used) == 2 and used <= set(alive_node_ids(cluster["gcs"])), placed


def test_status_reports_each_step_of_the_run(cluster, first_job):
    _, summary = first_job
    listing = subprocess.run([sys.executable, "-m", "pipelines.status", "--root", str(cluster["root"])],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert re.search(rf"{summary['run_id']}\s+tiny\s+finished", listing.stdout), listing.stdout + listing.stderr
    detail = subprocess.run([sys.executable, "-m", "pipelines.status", "--root", str(cluster["root"]),
                             summary["run_id"]], cwd=REPO, capture_output=True, text=True, timeout=120)
    for step in summary["steps"]:
        assert re.search(rf"{step['name']}\s+done\s+[\d.]+\s+\w+\s+{re.escape(step['out_dir'])}", detail.stdout), detail.stdout


def test_resubmission_is_all_cached(cluster, first_job):
    proc, summary = submit(cluster)
    assert {s["name"]: s["status"] for s in summary["steps"]} == {name: "cached" for name in STEPS}, proc.stdout[-3000:]


@pytest.fixture(scope="module")
def store_job(cluster, first_job):  # after the shared-root job: the two never run at once
    return submit(cluster, root=f"file://{cluster['store']}")


def test_object_store_root_runs_on_nodes_that_share_no_directory(cluster, store_job):
    """paths.root is a URI: each node has only its own cache (LMFORGE_CACHE) and the store. Every
    step fetched its inputs onto its node (the manifest's inputs lie in that node's cache) and
    published to the store, and work ran on both nodes."""
    proc, summary = store_job
    assert re.search(r"job \S+: SUCCEEDED", proc.stdout), proc.stdout[-3000:]
    assert {s["name"]: s["status"] for s in summary["steps"]} == {name: "ran" for name in STEPS}
    store, caches = cluster["store"], [str(c) for c in cluster["caches"]]
    cache_of_node, manifests = {}, {}
    for step in summary["steps"]:
        assert step["out_dir"] == f"file://{store}/{step['name']}/{step['fingerprint']}"
        manifest = manifests[step["name"]] = artifacts.read_manifest(store / step["name"] / step["fingerprint"])
        assert manifest and not artifacts.damage(store / step["name"] / step["fingerprint"], manifest)
        node = manifest["placement"]["node_ids"][0]
        for dep, path in manifest["inputs"].items():  # fetched onto the node that ran the step
            cache = next(c for c in caches if path.startswith(c + "/"))
            assert cache_of_node.setdefault(node, cache) == cache
            assert artifacts.read_manifest(Path(path))["digest"] == manifests[dep]["digest"]
    used = {m["placement"]["node_ids"][0] for m in manifests.values()}
    assert len(used) == 2 and len(set(cache_of_node.values())) == len(cache_of_node), (used, cache_of_node)
    assert not list(store.glob("*/.partial-*")) and not list(store.glob("*/.staging-*"))  # nothing half-done left


def test_object_store_root_resubmission_is_all_cached_and_status_reads_the_store(cluster, store_job):
    _, first = store_job
    proc, summary = submit(cluster, root=f"file://{cluster['store']}")
    assert {s["name"]: s["status"] for s in summary["steps"]} == {name: "cached" for name in STEPS}, proc.stdout[-3000:]
    detail = subprocess.run([sys.executable, "-m", "pipelines.status", "--root", f"file://{cluster['store']}",
                             first["run_id"]], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LMFORGE_CACHE": str(cluster["caches"][0])})
    for step in first["steps"]:
        assert re.search(rf"{step['name']}\s+done\s+[\d.]+\s+\w+\s+{re.escape(step['out_dir'])}", detail.stdout), detail.stdout
