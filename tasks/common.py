"""What every task shares: the error type users see, the context a task runs in, progress lines.

Tasks never import Ray or MLflow; the executor hands them a `TaskContext` whose
`parallel_map` runs work as Ray tasks and whose `log_metrics` reaches MLflow.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


class UserError(Exception):
    """Bad input or configuration. The entry point prints it as one line, without a traceback."""


def serial_map(fn: Callable, items: list) -> list:
    return [fn(item) for item in items]


def _no_metrics(metrics: dict, step: int | None = None) -> None:
    return None


@dataclass
class TaskContext:
    """How a task reaches the outside world."""

    step_name: str = "task"
    parallel_map: Callable[[Callable, list], list] = serial_map
    log_metrics: Callable[..., None] = _no_metrics
    num_cpus: int = 1
    extra: dict = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(f"[{self.step_name}] {message}", file=sys.stderr, flush=True)


class Progress:
    """Periodic progress line with rate and ETA (at most one line per `every_s` seconds)."""

    def __init__(self, ctx: TaskContext, total: int, unit: str, every_s: float = 5.0):
        self.ctx, self.total, self.unit, self.every_s = ctx, total, unit, every_s
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.ctx.say(f"{self.done}/{self.total} {self.unit} {rate:,.1f}/s eta {format_seconds(eta)} {extra}".rstrip())


def format_seconds(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def stable_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def hash_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by key and seed: used for splits that never depend on order."""
    digest = hashlib.sha1(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_files(directory: Path, skip: str) -> dict[str, dict]:
    """Every file below directory (but `skip`) with its size and SHA-256."""
    return {str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": file_digest(path)}
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != skip}


def files_problem(directory: Path, files: dict[str, dict]) -> str | None:
    """The first recorded file (record_files) that is missing or changed, said in words; None if all match."""
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size < expected["bytes"]:
            return f"{name} is truncated ({size} of {expected['bytes']} bytes)"
        if size != expected["bytes"]:
            return f"{name} changed size ({size} bytes, {expected['bytes']} recorded)"
        if file_digest(path) != expected["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def iter_jsonl(path, lines: Iterable[bytes] | None = None) -> Iterable[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a local file (or of `lines`, read
    from elsewhere); UserError names the file and line."""
    with contextlib.nullcontext(lines) if lines is not None else open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"{path}:{lineno}: invalid JSON line") from None


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
