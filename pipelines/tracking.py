"""The only module that talks to MLflow: one parent run per pipeline invocation, one nested
child run per step (tagged ran or cached, with its fingerprint), flattened config params,
per-step metrics, artifacts (resolved config, DAG picture, manifests, reports, loss curves,
evaluation table), and the fine-tuned model in the Model Registry.

The default store is SQLite under paths.root; `tracking.uri` or $MLFLOW_TRACKING_URI point
elsewhere. Training workers get a `MetricLogger` (picklable) that rank 0 calls.

A tracking server that cannot be reached at start stops the run with one line naming it
(or, with `tracking.on_unreachable=journal`, the run goes on and records its calls locally).
One that goes away mid-run never stops training: from then on every call goes to the run's
journal (pipelines/journal.py), which is replayed at the end if the server is back, or later:

    python -m pipelines.tracking replay <root>/runs/journal-<id> [--uri URI]
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

from pipelines import figures
from pipelines.tracking_models import apply_log_model, apply_register, run_of
from pipelines.journal import PENDING, Journal, pending_id
from pipelines.redaction import redact, redact_text
from tasks.common import UserError, first_line

METRIC_BATCH = 200  # MLflow's log_batch takes at most 1000 metrics; keep requests small
PARAM_BATCH = 100
PROBE_SECONDS = 5
# A call to a server that is gone fails within seconds instead of MLflow's default of minutes
# of retries (7 retries, 120 s timeout each); run links are printed once, in the summary.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
UNAVAILABLE_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def resolve_uri(configured: str | None, root: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    uri = redact_text(uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)}


def health_request(uri: str) -> urllib.request.Request:
    """GET <server>/health: credentials in the URI (user:password@host) go into a basic Authorization
    header, as MLflow's client sends them, never into the host name (which would send them to DNS)."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else (parts.hostname or "")
    netloc = host + (f":{parts.port}" if parts.port else "")
    request = urllib.request.Request(urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")))
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    return request


def unreachable(uri: str) -> str | None:
    """Why an HTTP tracking server does not answer (None when it does, or for a local store)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(health_request(uri), timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # it answered (a proxy or an authenticating server may refuse /health)
    except (OSError, ValueError) as error:
        return str(getattr(error, "reason", error))
    return None


def is_unavailable(error: BaseException) -> bool:
    """The server is away (connection refused, timeout, 5xx), as opposed to a refused request."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    if isinstance(error, MlflowException):
        return error.error_code in UNAVAILABLE_CODES
    return isinstance(error, (OSError, RequestException))


@contextlib.contextmanager
def sqlite_creation_lock(uri: str):
    """Hold an exclusive lock beside a SQLite tracking store while it is opened (and, the first time,
    created and migrated by MLflow): concurrent first launches on a fresh root otherwise race in
    alembic ('Online migration expected to match one row'). Other stores: no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".init-lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client(uri: str):
    import logging

    for name, value in CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    for name in ("mlflow", "mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --- the calls, one function each, used live and when a journal is replayed -------------------

EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
"""Opens the experiment in MLflow's model-training view (runs, metrics, models), not its GenAI view."""


def apply_experiment(client, call: dict, ids: dict) -> str:
    found = client.get_experiment_by_name(call["name"])
    real = found.experiment_id if found else client.create_experiment(call["name"], artifact_location=call.get("location"))
    if not found or EXPERIMENT_KIND_TAG not in found.tags:  # also an experiment made before lmforge set it
        client.set_experiment_tag(real, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    ids[call["id"]] = real
    return real


def apply_create_run(client, call: dict, ids: dict) -> str:
    tags = {k: ids.get(v, v) for k, v in call["tags"].items()}
    run = client.create_run(ids.get(call["experiment"], call["experiment"]), run_name=call["run_name"], tags=tags,
                            start_time=call["start_time"])
    ids[call["id"]] = run.info.run_id
    return run.info.run_id


def apply_log_batch(client, call: dict, ids: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(run_of(call, ids), metrics=[Metric(*m) for m in call.get("metrics", [])],
                     params=[Param(*p) for p in call.get("params", [])], tags=[RunTag(*t) for t in call.get("tags", [])])


def apply_log_artifact(client, call: dict, ids: dict) -> None:
    if Path(call["path"]).is_dir():
        client.log_artifacts(run_of(call, ids), call["path"], call.get("artifact_path"))
    else:
        client.log_artifact(run_of(call, ids), call["path"], call.get("artifact_path"))


def apply_log_text(client, call: dict, ids: dict) -> None:
    client.log_text(run_of(call, ids), call["text"], call["name"])


def apply_log_table(client, call: dict, ids: dict) -> None:
    client.log_table(run_of(call, ids), data=call["data"], artifact_file=call["name"])


def apply_log_inputs(client, call: dict, ids: dict) -> None:
    """The data sets a step read (MLflow's Dataset column): name, digest, where they are, in which role."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client.log_inputs(run_of(call, ids), datasets=[
        DatasetInput(Dataset(d["name"], d["digest"], "local" if "://" not in d["source"] else "uri", d["source"]),
                     tags=[InputTag("mlflow.data.context", d["context"])]) for d in call["datasets"]])


def apply_terminate(client, call: dict, ids: dict) -> None:
    client.set_terminated(run_of(call, ids), status=call["status"], end_time=call["end_time"])


APPLY: dict[str, Callable] = {
    "experiment": apply_experiment, "create_run": apply_create_run, "log_batch": apply_log_batch,
    "log_artifact": apply_log_artifact, "log_text": apply_log_text, "log_table": apply_log_table,
    "log_inputs": apply_log_inputs, "log_model": apply_log_model, "terminate": apply_terminate,
    "register": apply_register,
}


def replay(directory: Path, uri: str) -> int:
    """Send a journal's remaining calls to the server, in order; returns how many were sent.
    Progress is saved after each call, so an interrupted replay continues where it stopped."""
    journal = Journal(directory)
    client = _client(uri)
    progress = journal.progress()
    calls = journal.calls()
    for index in range(progress["done"], len(calls)):
        APPLY[calls[index]["op"]](client, calls[index], progress["ids"])
        progress["done"] = index + 1
        journal.save_progress(progress)
    return len(calls)


def metric_entries(metrics: dict, step: int | None) -> list[list]:
    now = int(time.time() * 1000)
    return [[key, float(value), now, step or 0] for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


class MetricLogger:
    """Logs step metrics to one run; created on the driver, called in workers (rank 0). When the
    server is away, the metrics go to the run's journal and training goes on."""

    def __init__(self, uri: str, run_id: str, journal_dir: Path, lost: bool = False):
        self.uri, self.run_id, self.journal_dir, self.lost, self._client = uri, run_id, journal_dir, lost, None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    def __call__(self, metrics: dict, step: int | None = None) -> None:
        entries = metric_entries(metrics, step)
        for start in range(0, len(entries), METRIC_BATCH):
            call = {"run": self.run_id, "metrics": entries[start : start + METRIC_BATCH]}
            if not self.lost and not self.run_id.startswith(PENDING):
                try:
                    if self._client is None:
                        self._client = _client(self.uri)
                    apply_log_batch(self._client, call, {})
                    continue
                except Exception as error:
                    if not is_unavailable(error):
                        raise
                    self.lost = True
                    print(f"tracking: the MLflow server is unreachable ({error_line(error)}); "
                          f"metrics are journaled in {self.journal_dir}", file=sys.stderr, flush=True)
            Journal(self.journal_dir, self.uri).add("log_batch", **call)


def error_line(error: BaseException) -> str:
    """An error's first line (tasks/common.py: first_line), secrets redacted: for one-line messages."""
    return redact_text(first_line(error))


class Tracker:
    def __init__(self, uri: str, experiment: str, root: Path, on_unreachable: str = "fail"):
        self.uri = uri
        self.journal = Journal(root.resolve() / "runs" / f"journal-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                               uri)
        self.lost: str | None = None
        self.ids: dict[str, str] = {}
        reason = unreachable(uri)
        if reason and on_unreachable == "fail":
            raise UserError(f"tracking.uri: the MLflow server {redact_text(uri)} cannot be reached ({reason}); start "
                            f"it, correct tracking.uri, or set tracking.on_unreachable=journal to record the run "
                            f"locally and replay it later")
        location = (root.resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        with sqlite_creation_lock(uri):  # two first launches would both create and migrate the store
            self.client = None if reason else _client(uri)
            if reason:
                self._lose(reason)
            self.experiment_id = self._do("experiment", name=experiment, id=pending_id(), location=location)
        self.parent_id: str | None = None

    def _lose(self, reason: str) -> None:
        self.lost = reason
        print(f"tracking: the MLflow server {redact_text(self.uri)} is unreachable ({reason}); the run goes on "
              f"and its tracking calls are kept in {self.journal.directory}", file=sys.stderr, flush=True)

    def _do(self, op: str, **call) -> Any:
        """One MLflow call, or, while the server is away, its record in the journal."""
        if self.lost is None:
            try:
                return APPLY[op](self.client, call, self.ids)
            except Exception as error:
                if not is_unavailable(error):
                    raise
                self._lose(error_line(error))
        if op == "log_artifact" and call.get("temporary"):
            call["path"] = self.journal.keep_file(Path(call["path"]))
        self.journal.add(op, **call)
        return call.get("id")

    def _create_run(self, run_name: str, tags: dict) -> str:
        return self._do("create_run", id=pending_id(), experiment=self.experiment_id, run_name=run_name,
                        tags=tags, start_time=int(time.time() * 1000))

    def start(self, run_name: str, params: dict, tags: dict) -> str:
        self.parent_id = self._create_run(run_name, tags)
        self.log_params(self.parent_id, params)
        return self.parent_id

    def log_params(self, run_id: str, params: dict) -> None:
        entries = [[k[:250], v[:6000]] for k, v in sorted(flatten(redact(params)).items())]
        for start in range(0, len(entries), PARAM_BATCH):
            self._do("log_batch", run=run_id, params=entries[start : start + PARAM_BATCH])

    def start_step(self, name: str, fingerprint: str, status: str, reason: str, params: dict) -> str:
        tags = {"mlflow.parentRunId": self.parent_id, "lmforge.step": name, "lmforge.fingerprint": fingerprint,
                "lmforge.status": status, "lmforge.reason": reason}
        run_id = self._create_run(f"{name} (cached)" if status == "cached" else name, tags)
        self.log_params(run_id, params)
        return run_id

    def log_inputs(self, run_id: str, datasets: list[dict]) -> None:
        if datasets:
            self._do("log_inputs", run=run_id, datasets=datasets)

    def metric_logger(self, run_id: str) -> MetricLogger:
        return MetricLogger(self.uri, run_id, self.journal.directory, lost=self.lost is not None)

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        entries = metric_entries(metrics, step)
        for start in range(0, len(entries), METRIC_BATCH):
            self._do("log_batch", run=run_id, metrics=entries[start : start + METRIC_BATCH])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self._do("log_batch", run=run_id, tags=[[k, str(v)[:5000]] for k, v in tags.items()])

    def log_artifacts(self, run_id: str, paths: list[Path]) -> None:
        for path in paths:
            if path.exists():
                self._do("log_artifact", run=run_id, path=str(path))

    def log_table(self, run_id: str, rows: list[dict], name: str) -> None:
        """Rows as an MLflow table (shown in the UI's artifact view and Evaluation tab)."""
        if not rows:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        data = {c: [row.get(c) if isinstance(row.get(c), (str, int, float)) or row.get(c) is None
                    else json.dumps(row.get(c)) for row in rows] for c in columns}
        self._do("log_table", run=run_id, data=data, name=name)

    def log_jsonl_table(self, run_id: str, jsonl_path: Path, name: str) -> None:
        if jsonl_path.exists():
            self.log_table(run_id, [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()],
                           name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self._do("log_text", run=run_id, text=text, name=name)

    def log_figure(self, run_id: str, draw: Callable[[Path], Any], name: str) -> None:
        """A PNG drawn by `draw(path)` (which returns False when there is nothing to draw)."""
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / name
            if draw(png) is not False:
                self._do("log_artifact", run=run_id, path=str(png), temporary=True)

    def log_loss_curve(self, run_id: str, history_path: Path, title: str) -> None:
        self.log_figure(run_id, lambda png: figures.loss_curve(history_path, title, png), "loss_curve.png")

    def log_model(self, run_id: str, name: str, model_dir: Path, example: str) -> None:
        """An exported model directory as an MLflow model of run `run_id` (see tracking_models)."""
        self._do("log_model", run=run_id, name=name, model_dir=str(model_dir), example=example)

    def register_model(self, name: str, alias: str, run_id: str, dirs: dict[str, Path], tags: dict,
                       example: str) -> str | None:
        """Register a fine-tuned result (the directories in `dirs`) as a version of `name`, with `alias`;
        `example` is the input example of its MLflow model (a prompt as the model saw them)."""
        return self._do("register", name=name, alias=alias, run=run_id, dirs={k: str(v) for k, v in dirs.items()},
                        fingerprint=tags["lmforge.fingerprint"], tags=tags, example=example)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._do("terminate", run=run_id, status=status, end_time=int(time.time() * 1000))

    def finish(self) -> dict:
        """After the run: replay the journal if the server is back. What happened, for the summary."""
        if not self.journal.calls():
            return {}
        outcome = {"journal": str(self.journal.directory), "calls": self.journal.summary(), "lost": self.lost}
        if unreachable(self.uri) is None:
            try:
                replay(self.journal.directory, self.uri)
                return {**outcome, "replayed": True}
            except Exception as error:
                if not is_unavailable(error):
                    raise
        return {**outcome, "replayed": False}


# --- reading runs back (pipelines/status.py) ---------------------------------------------------

def find_runs(uri: str, experiment: str, parent_id: str | None = None, limit: int = 20) -> list[dict]:
    """Pipeline runs (parent_id None) or the step runs of one, as plain dicts."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = f"tags.mlflow.parentRunId = '{parent_id}'" if parent_id else "tags.`lmforge.experiment` LIKE '%'"
    runs = client.search_runs([found.experiment_id], filter_string=query, max_results=limit if not parent_id else 1000,
                              order_by=["attributes.start_time DESC"])
    return [run_as_dict(r) for r in runs]


def find_run(uri: str, run_id: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        return run_as_dict(_client(uri).get_run(run_id))
    except MlflowException:
        return None


def run_as_dict(run) -> dict:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "start": run.info.start_time, "end": run.info.end_time, "tags": dict(run.data.tags)}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.tracking",
                                     description="Replay a run's tracking journal to an MLflow server.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("replay", help="send the calls kept in a journal directory to the server")
    cmd.add_argument("journal", type=Path)
    cmd.add_argument("--uri", help="tracking URI (default: the run's tracking.uri, kept in the journal)")
    args = parser.parse_args(argv)
    journal = Journal(args.journal)
    if not journal.calls_path.exists():
        print(f"error: {args.journal}: not a tracking journal (no calls.jsonl)", file=sys.stderr)
        return 2
    if not args.uri and not (args.journal / "uri.json").exists():
        print(f"error: {args.journal}: give the server with --uri (its URI holds a password, so it was not kept)",
              file=sys.stderr)
        return 2
    uri = args.uri or json.loads((args.journal / "uri.json").read_text())["uri"]
    total = replay(args.journal, uri)
    print(f"replayed {total} calls ({journal.summary()}) to {redact_text(uri)}; run ids: {journal.progress()['ids']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
