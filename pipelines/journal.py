"""The tracking journal: MLflow calls that could not reach the tracking server, kept on disk in
order so that no metric, parameter or artifact of a run is lost.

    <root>/runs/journal-<id>/calls.jsonl   one call per line (appended by the driver and workers)
    <root>/runs/journal-<id>/files/        copies of the files those calls logged
    <root>/runs/journal-<id>/progress.json calls replayed so far, and the ids given to new runs

Runs created while the server was away get a `pending-...` id here; the replay
(`python -m pipelines.tracking replay DIR`) creates them on the server and maps the ids.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from pipelines.redaction import redact_text
from tasks.common import write_json

PENDING = "pending-"


def pending_id() -> str:
    return PENDING + uuid.uuid4().hex


class Journal:
    def __init__(self, directory: Path, uri: str = ""):
        self.directory = Path(directory)
        self.uri = uri
        """The tracking URI the calls were meant for; kept (unless it holds a password) for the replay."""

    @property
    def calls_path(self) -> Path:
        return self.directory / "calls.jsonl"

    def add(self, op: str, **args) -> None:
        """Append one call; a single write on an O_APPEND file, so processes do not interleave lines."""
        if not self.directory.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.uri and redact_text(self.uri) == self.uri:
                write_json(self.directory / "uri.json", {"uri": self.uri})
        line = (json.dumps({"op": op, **args}, default=str) + "\n").encode("utf-8")
        fd = os.open(self.calls_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def keep_file(self, path: Path) -> str:
        """A copy of a file that may not outlive the run (a temporary plot); returns the copy's path."""
        target = self.directory / "files" / uuid.uuid4().hex[:8] / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        return str(target)

    def calls(self) -> list[dict]:
        if not self.calls_path.exists():
            return []
        return [json.loads(line) for line in self.calls_path.read_text().splitlines() if line.strip()]

    def progress(self) -> dict:
        try:
            return json.loads((self.directory / "progress.json").read_text())
        except (OSError, ValueError):
            return {"done": 0, "ids": {}}

    def save_progress(self, progress: dict) -> None:
        write_json(self.directory / "progress.json", progress)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for call in self.calls():
            counts[call["op"]] = counts.get(call["op"], 0) + 1
        return ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "nothing"
