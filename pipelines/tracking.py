"""The only module that talks to MLflow: one parent run per pipeline invocation, one nested
child run per step (tagged ran or cached, with its fingerprint), flattened config params,
per-step metrics, and artifacts (resolved config, manifests, reports, loss curves).

The default store is SQLite under paths.root; `tracking.uri` or $MLFLOW_TRACKING_URI point
elsewhere. Training workers get a `MetricLogger` (picklable) that rank 0 calls.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipelines.redaction import redact, redact_text

METRIC_BATCH = 200  # MLflow's log_batch takes at most 1000 metrics; keep requests small
PARAM_BATCH = 100


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


def _client(uri: str):
    import logging

    for name in ("mlflow", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MetricLogger:
    """Logs step metrics to one run; created on the driver, called in workers (rank 0)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self._client = uri, run_id, None

    def __getstate__(self):
        return {"uri": self.uri, "run_id": self.run_id, "_client": None}

    def __call__(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        if self._client is None:
            self._client = _client(self.uri)
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        for start in range(0, len(entries), METRIC_BATCH):
            self._client.log_batch(self.run_id, metrics=entries[start : start + METRIC_BATCH])


class Tracker:
    def __init__(self, uri: str, experiment: str, root: Path):
        self.uri = uri
        self.client = _client(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = (root.resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.parent_id: str | None = None

    def start(self, run_name: str, params: dict, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        entries = [Param(k[:250], v[:6000]) for k, v in sorted(flatten(redact(params)).items())]
        for start in range(0, len(entries), PARAM_BATCH):
            self.client.log_batch(run_id, params=entries[start : start + PARAM_BATCH])

    def start_step(self, name: str, fingerprint: str, status: str, reason: str, params: dict) -> str:
        tags = {"mlflow.parentRunId": self.parent_id, "lmforge.step": name, "lmforge.fingerprint": fingerprint,
                "lmforge.status": status, "lmforge.reason": reason}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self.log_params(run_id, params)
        return run_id

    def metric_logger(self, run_id: str) -> MetricLogger:
        return MetricLogger(self.uri, run_id)

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        self.metric_logger(run_id)(metrics, step)

    def log_artifacts(self, run_id: str, paths: list[Path]) -> None:
        for path in paths:
            if path.exists():
                self.client.log_artifact(run_id, str(path))

    def log_table(self, run_id: str, jsonl_path: Path, name: str) -> None:
        """Rows of a JSONL file as an MLflow table (shown in the UI's artifact view and Evaluation tab)."""
        if not jsonl_path.exists():
            return
        rows = [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        data = {c: [row[c] if isinstance(row.get(c), (str, int, float)) else json.dumps(row.get(c)) for row in rows]
                for c in columns}
        self.client.log_table(run_id, data=data, artifact_file=name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_loss_curve(self, run_id: str, history_path: Path, title: str) -> None:
        """A PNG of training and validation loss from a step's train_log.jsonl."""
        if not history_path.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(figsize=(6, 4))
        trained = [r for r in rows if "loss" in r]  # a window of only skipped steps has no loss
        ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], label="train loss")
        val = [r for r in rows if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=title)
        ax.legend()
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "loss_curve.png"
            fig.savefig(png, dpi=100, bbox_inches="tight")
            plt.close(fig)
            self.client.log_artifact(run_id, str(png))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
