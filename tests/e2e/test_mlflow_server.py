"""The pipeline against a real `mlflow server` over HTTP, read back through its REST API the way
the UI does: parent and child runs, metrics, artifacts, the registered model and its alias.
Then the faults: a server that is down at start (a fast, clear error, or a journal on request)
and a server that goes away mid-run (the run finishes, nothing is lost, the journal replays)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines import artifacts
from tests.conftest import REPO
from tests.integration.test_resume import free_port

STEPS = ["ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune", "evaluate"]


class Server:
    """An `mlflow server` on localhost with a SQLite store; stop() and start() keep the store."""

    def __init__(self, directory):
        self.directory, self.port, self.proc = directory, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.directory}/mlflow.db", "--workers", "1",
             "--artifacts-destination", str(self.directory / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return self
            except OSError:
                assert self.proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn workers, at once
            self.proc.wait()

    def get(self, endpoint: str, **query) -> dict:
        from urllib.parse import urlencode

        with urllib.request.urlopen(f"{self.uri}/api/2.0/mlflow/{endpoint}?{urlencode(query)}", timeout=30) as answer:
            return json.loads(answer.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def children(self, parent_id: str, experiment_id: str) -> dict[str, dict]:
        found = self.post("runs/search", {"experiment_ids": [experiment_id], "max_results": 100,
                                          "filter": f"tags.mlflow.parentRunId = '{parent_id}'"})
        return {tag(run, "lmforge.step"): run for run in found.get("runs", [])}

    def artifacts(self, run_id: str, path: str = "") -> set[str]:
        return {f["path"] for f in self.get("artifacts/list", run_id=run_id, path=path).get("files", [])}


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow_server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tracked")


def launch(root, uri, *overrides):
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}", "ray.num_cpus=2",
         f"tracking.uri={uri}", *overrides], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, expect=0) -> tuple[str, dict | None]:
    output = proc.communicate(timeout=1200)[0]
    assert proc.returncode == expect, output[-4000:]
    found = re.search(r"summary JSON:\s+(\S+)", output)
    return output, json.loads(open(found.group(1)).read()) if found else None


@pytest.fixture(scope="module")
def first_run(root, server):
    return finish(launch(root, server.uri))


def test_a_run_is_reviewable_through_the_servers_rest_api(first_run, server):
    output, summary = first_run
    assert f"open {server.uri}" in output
    experiment = server.get("experiments/get-by-name", experiment_name="lmforge")["experiment"]
    experiment_id = experiment["experiment_id"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]  # training view
    parent = server.get("runs/get", run_id=summary["run_id"])["run"]
    assert parent["info"]["run_name"] == "tiny" and tag(parent, "mlflow.source.name") == "pipelines.run"
    assert tag(parent, "mlflow.source.git.commit") == tag(parent, "lmforge.code_version").removesuffix("+dirty")
    assert parent["info"]["status"] == "FINISHED" and tag(parent, "lmforge.cache_hits") == f"0/{len(STEPS)}"
    assert tag(parent, "lmforge.code_version") and tag(parent, "lmforge.step.pretrain").startswith("ran ")
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["pretrain.max_steps"] == "8" and params["experiment_name"] == "tiny"
    assert {"config.yaml", "dag.png", "evaluation.json", f"{summary['run_id']}.json"} <= server.artifacts(parent["info"]["run_id"])
    assert any(m["key"] == "finetuned_accuracy" for m in parent["data"]["metrics"])

    children = server.children(summary["run_id"], experiment_id)
    assert set(children) == set(STEPS)
    for name, run in children.items():
        assert tag(run, "lmforge.status") == "run" and run["info"]["status"] == "FINISHED"
        assert "_manifest.json" in server.artifacts(run["info"]["run_id"]), name
    pretrain = children["pretrain"]["info"]["run_id"]
    history = server.get("metrics/get-history", run_id=pretrain, metric_key="loss")["metrics"]
    assert len(history) >= 3 and "loss_curve.png" in server.artifacts(pretrain)
    assert "samples.json" in server.artifacts(children["evaluate"]["info"]["run_id"])
    fingerprints = {name: tag(run, "lmforge.fingerprint") for name, run in children.items()}
    (tokens,) = server.get("runs/get", run_id=pretrain)["run"]["inputs"]["dataset_inputs"]  # the Dataset column
    assert (tokens["dataset"]["name"], tokens["dataset"]["digest"]) == ("token arrays", fingerprints["tokenize"])
    assert tokens["tags"] == [{"key": "mlflow.data.context", "value": "training"}]

    version = server.get("registered-models/alias", name="lmforge-tiny", alias="candidate")["model_version"]
    finetune = children["finetune"]["info"]["run_id"]
    assert version["run_id"] == finetune and version["source"].startswith("models:/m-")
    assert "adapter_config.json" in {p.rsplit("/", 1)[-1] for p in server.artifacts(finetune, "finetuned/adapter")}
    models = server.post("logged-models/search", {"experiment_ids": [experiment_id]})["models"]
    by_run = {m["info"]["source_run_id"]: m["info"] for m in models}
    assert f"models:/{by_run[finetune]['model_id']}" == version["source"] and by_run[finetune]["name"] == "finetuned"
    assert by_run[pretrain]["name"] == "pretrained"  # the pretrained model too, an output of its step's run
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["lmforge.fingerprint"] == tag(children["finetune"], "lmforge.fingerprint")
    assert "finetuned_accuracy" in tags


def test_the_registered_model_loads_and_serves_with_mlflow(first_run, server, monkeypatch, tmp_path):
    """What an MLflow user does with a registered version: pyfunc and transformers loaders by alias,
    and `mlflow models serve` on loopback answering /invocations; the pretrained model generates."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    prompt = "def fileConfig(fname):\n### Label:"  # the tiny task's prompt format
    steps = {s["name"]: s for s in first_run[1]["steps"]}
    labels = json.loads((Path(steps["taskdata"]["out_dir"]) / "labels.json").read_text())
    predicted = mlflow.pyfunc.load_model("models:/lmforge-tiny@candidate").predict([prompt])
    assert predicted["label"][0] in labels and 0 < predicted["score"][0] <= 1
    pipe = mlflow.transformers.load_model("models:/lmforge-tiny@candidate")
    assert pipe.task == "text-classification" and pipe(prompt)[0]["label"] == predicted["label"][0]

    experiment_id = server.get("runs/get", run_id=steps["pretrain"]["run_id"])["run"]["info"]["experiment_id"]
    (logged,) = [m["info"] for m in server.post("logged-models/search", {"experiment_ids": [experiment_id]})["models"]
                 if m["info"]["source_run_id"] == steps["pretrain"]["run_id"]]
    generated = mlflow.pyfunc.load_model(f"models:/{logged['model_id']}").predict(["def "], params={"max_new_tokens": 4})
    assert isinstance(generated[0], str) and generated[0].startswith("def ")

    port, log = free_port(), tmp_path / "serve.log"
    bin_dir = str(Path(sys.executable).parent)  # the scoring server's uvicorn, as in an activated venv
    with open(log, "w") as out:
        serving = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/lmforge-tiny@candidate",
                                    "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": [prompt]}).encode(),
                                         headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    served = json.loads(answer.read())["predictions"]
                break
            except OSError:
                assert serving.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        assert served[0]["label"] == predicted["label"][0]
    finally:
        if serving.poll() is None:
            os.killpg(serving.pid, signal.SIGKILL)
        serving.wait()


def test_a_cached_rerun_reuses_the_registered_version(first_run, root, server):
    output, summary = finish(launch(root, server.uri))
    assert all(step["status"] == "cached" for step in summary["steps"]), output[:3000]
    parent = server.get("runs/get", run_id=summary["run_id"])["run"]
    assert tag(parent, "lmforge.cache_hits") == f"{len(STEPS)}/{len(STEPS)}"
    assert parent["info"]["run_name"] == f"tiny (cached {len(STEPS)}/{len(STEPS)})"
    experiment_id = parent["info"]["experiment_id"]
    produced = {name: run["info"]["run_id"] for name, run in server.children(first_run[1]["run_id"], experiment_id).items()}
    for name, run in server.children(summary["run_id"], experiment_id).items():  # each links the run that computed it
        assert run["info"]["run_name"] == f"{name} (cached)" and tag(run, "lmforge.produced_by") == produced[name]
    versions = server.get("model-versions/search", filter="name='lmforge-tiny'")["model_versions"]
    assert len(versions) == 1
    assert server.get("registered-models/alias", name="lmforge-tiny", alias="candidate")["model_version"]["version"] == "1"


def test_an_unreachable_server_stops_the_run_at_once_naming_it(root, fault_table):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    output, _ = finish(launch(root / "unreached", uri), expect=2)
    assert time.monotonic() - started < 60
    assert f"error: tracking.uri: the MLflow server {uri} cannot be reached" in output
    assert "tracking.on_unreachable=journal" in output
    assert not any(p.name in STEPS for p in (root / "unreached").iterdir())  # no work was started
    fault_table("MLflow server down at start", "tracking.uri to a closed port",
                f"exit 2 in {time.monotonic() - started:.0f} s naming tracking.uri and the URI (or, with "
                "tracking.on_unreachable=journal, run recorded locally and replayed)", "-", "0")


def test_secrets_in_the_tracking_uri_reach_no_file_and_no_output(tmp_path):
    """A password in the URI and a token in its query string: not in what is printed, not in any file under
    the root (Hydra's .hydra/ copies included), and the reachability probe does not resolve them as a host."""
    uri = f"http://alice:PW-planted-1@127.0.0.1:{free_port()}/?access_token=TOKEN-planted-2"
    output, _ = finish(launch(tmp_path, f"'{uri}'"), expect=2)
    assert "cannot be reached" in output and "Connection refused" in output  # not a DNS failure on 'alice:PW...'
    assert "http://alice:***@127.0.0.1" in output
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.name == ".hydra" and p.name == "overrides.yaml" for p in written)
    for text in [output] + [p.read_text(errors="replace") for p in written]:
        assert not re.search("planted", text), text[:2000]


def test_journal_mode_records_the_run_locally_and_replays_it(first_run, root, server):
    dead = f"http://127.0.0.1:{free_port()}"
    output, summary = finish(launch(root, dead, "tracking.on_unreachable=journal"))
    assert all(step["status"] == "cached" for step in summary["steps"])
    assert not summary["tracking"]["replayed"] and summary["run_id"].startswith("pending-")
    journal = summary["tracking"]["journal"]
    assert f"python -m pipelines.tracking replay {journal}" in output

    replay = subprocess.run([sys.executable, "-m", "pipelines.tracking", "replay", journal, "--uri", server.uri],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr[-3000:]
    parent_id = json.loads((Path(journal) / "progress.json").read_text())["ids"][summary["run_id"]]
    parent = server.get("runs/get", run_id=parent_id)["run"]
    assert parent["info"]["status"] == "FINISHED" and tag(parent, "lmforge.cache_hits") == f"{len(STEPS)}/{len(STEPS)}"
    experiment_id = parent["info"]["experiment_id"]
    assert set(server.children(parent_id, experiment_id)) == set(STEPS)
    again = subprocess.run([sys.executable, "-m", "pipelines.tracking", "replay", journal, "--uri", server.uri],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(server.children(parent_id, experiment_id)) == len(STEPS)  # no duplicates


def test_a_server_lost_mid_run_loses_nothing(first_run, root, server, fault_table):
    proc = launch(root, server.uri, "finetune.max_steps=12", "finetune.checkpoint_every=0")
    partial = None
    deadline = time.monotonic() + 600
    while partial is None and proc.poll() is None and time.monotonic() < deadline:
        logs = list((root / "finetune").glob(".partial-*/train_log.jsonl"))
        partial = logs[0] if logs and logs[0].read_text().strip() else None
        time.sleep(0.1)
    assert partial is not None, "fine-tuning never started"
    server.stop()
    try:
        output, summary = finish(proc)
    finally:
        server.start()
    assert "could not be reached" in output and not summary["tracking"]["replayed"]
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert statuses["finetune"] == "ran" and statuses["evaluate"] == "ran"
    for step in summary["steps"]:  # every result is on disk, complete
        directory = artifacts.step_dir(root, step["name"], step["fingerprint"])
        assert artifacts.damage(directory, artifacts.read_manifest(directory)) is None

    journal = summary["tracking"]["journal"]
    replay = subprocess.run([sys.executable, "-m", "pipelines.tracking", "replay", journal],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr[-3000:]
    ids = json.loads((Path(journal) / "progress.json").read_text())["ids"]
    parent_id = ids.get(summary["run_id"], summary["run_id"])
    parent = server.get("runs/get", run_id=parent_id)["run"]
    assert parent["info"]["status"] == "FINISHED"
    children = server.children(parent_id, parent["info"]["experiment_id"])
    assert set(children) == set(STEPS)
    finetune = children["finetune"]["info"]["run_id"]
    steps_logged = {m["step"] for m in server.get("metrics/get-history", run_id=finetune, metric_key="loss")["metrics"]}
    assert steps_logged == set(range(1, 13)), steps_logged  # log_every=1: every step, before and after the loss
    evaluate = children["evaluate"]["info"]["run_id"]
    assert any(m["key"] == "finetuned_accuracy" for m in server.get("runs/get", run_id=evaluate)["run"]["data"]["metrics"])
    version = server.get("registered-models/alias", name="lmforge-tiny", alias="candidate")["model_version"]
    assert version["version"] == "2" and version["run_id"] == finetune
    fault_table("MLflow server gone mid-run", "server killed during fine-tuning",
                "training went on; exit 0; calls journaled; replay put every metric, run and the model version "
                "on the server", "none", "0 (12 of 12 loss points)")
