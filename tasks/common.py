"""What every task shares: the error type users see, the context a task runs in, progress lines.

Tasks never import Ray, MLflow or pipelines/; the executor hands them a `TaskContext` whose
`parallel_map` runs work as Ray tasks, whose `log_metrics` reaches MLflow, whose `mirror` keeps
checkpoints and work units where the next attempt finds them and whose `stop` says when to stop
(both implemented for each storage mode by pipelines/storage.py).
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
from typing import Any, Callable, Iterable, Protocol


class UserError(Exception):
    """Bad input or configuration. The entry point prints it as one line, without a traceback."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error's first line, at most `limit` characters (its type's name when it says nothing): what
    a one-line message quotes of an error from a library, whose later lines are details or a traceback."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def filesystem(location: str) -> tuple[Any, str]:
    """The pyarrow filesystem of a local path or a URI (file://, s3://, gs://, hdfs://) and the path
    inside it. A URI pyarrow cannot use raises its error (pyarrow.ArrowException, ValueError or
    OSError), which the caller turns into a UserError naming its config key."""
    import pyarrow.fs as pafs  # pyarrow is loaded by the tasks that read files, not by every user of UserError

    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def serial_map(fn: Callable, items: list, on_result: Callable[[int, Any], None] | None = None) -> list:
    """fn over items in this process; on_result(index, result) after each, as `parallel_map` does."""
    results = []
    for index, item in enumerate(items):
        results.append(fn(item))
        if on_result:
            on_result(index, results[-1])
    return results


def _no_metrics(metrics: dict, step: int | None = None) -> None:
    return None


class Mirror(Protocol):
    """Keeps a step's working files (a training step's checkpoints, loss history and best weights; the
    ingest step's finished work units) where the next attempt finds them, on whichever node it runs.
    A local path below the node's root stands for the same place in what is kept."""

    def tends(self, rank: int) -> bool:
        """Whether this rank looks after its node's copy of the files (records, uploads, prunes)."""

    def upload(self, path: Path, exclude: tuple[str, ...] = (), replace: bool = True) -> None:
        """Keep a file, or the files below a folder (not dot-files, nor below `exclude`d sub-folders);
        replace=False keeps kept files of the same size, replace=True also drops kept files gone here."""

    def download(self, path: Path, exclude: tuple[str, ...] = (), replace: bool = True) -> None:
        """The kept files below `path` into this node's copy; replace=False keeps local files of the same size."""

    def folders(self, path: Path) -> list[str]:
        """The names of the kept sub-folders of `path`."""

    def has(self, path: Path) -> bool:
        """Whether the file is kept."""

    def remove(self, path: Path) -> None:
        """Drop a kept folder."""

    def drop_unkept(self, path: Path, kept: list[str], pattern: str) -> None:
        """Remove this node's sub-folders of `path` matching `pattern` that are not among `kept` (a
        node's copy may hold what was never kept, and the other nodes lack)."""


@dataclass(frozen=True)
class SharedFolder:
    """The Mirror of a directory every rank sees (a shared paths.root, or a task run on its own): the
    files already are where the next attempt looks, so nothing is kept apart from them, nothing
    moves, and rank 0 alone tends them."""

    def tends(self, rank: int) -> bool:
        return rank == 0

    def upload(self, path: Path, exclude: tuple[str, ...] = (), replace: bool = True) -> None:
        return None

    def download(self, path: Path, exclude: tuple[str, ...] = (), replace: bool = True) -> None:
        return None

    def folders(self, path: Path) -> list[str]:
        return []

    def has(self, path: Path) -> bool:
        return False

    def remove(self, path: Path) -> None:
        return None

    def drop_unkept(self, path: Path, kept: list[str], pattern: str) -> None:
        return None


class StopChannel(Protocol):
    """How a running training step learns that it should stop: a stop request (SIGTERM or Ctrl-C on the
    driver: checkpoint at the end of the current step and return) or another launch having taken the
    step over (stop at once, without writing)."""

    def request(self) -> None:
        """Ask for a stop (SIGTERM reaching a process that trains in its main thread)."""

    def requested(self) -> bool:
        """Whether a stop was asked for."""

    def superseded(self) -> bool:
        """Whether another launch owns the step now."""


@dataclass
class StopFlag:
    """The StopChannel of a task run on its own: a stop is what `request()` asked for; nothing supersedes it."""

    asked: bool = False

    def request(self) -> None:
        self.asked = True

    def requested(self) -> bool:
        return self.asked

    def superseded(self) -> bool:
        return False


class Superseded(RuntimeError):
    """Another launch took over this training step's directory."""


@dataclass
class TaskContext:
    """How a task reaches the outside world."""

    step_name: str = "task"
    parallel_map: Callable[..., list] = serial_map
    """parallel_map(fn, items, on_result=None) -> results in input order; on_result(index, result) is
    called in this process as each one finishes (in the order they finish)."""
    log_metrics: Callable[..., None] = _no_metrics
    num_cpus: int = 1
    work_dir: Path | None = None
    """A data step's working directory for what must survive a failed attempt (finished work units):
    fixed per fingerprint, kept until the step is published (the executor sets it); None: nothing survives."""
    mirror: Mirror = SharedFolder()
    """Keeps checkpoints and finished work units for the next attempt: where the Ray nodes share no
    directory (paths.root is a URI) through the store (pipelines/storage.py)."""
    stop: StopChannel = field(default_factory=StopFlag)
    """A training step's stop requests and takeovers (pipelines/storage.py: through the step's directory)."""
    extra: dict = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(f"[{self.step_name}] {message}", file=sys.stderr, flush=True)


class Progress:
    """Periodic progress line with rate and ETA (at most one line per `every_s` seconds). `done`: work
    finished before (a resumed step's), not counted in the rates. Further counters passed to `update`
    (docs=..., MB=...) are shown as rates too."""

    def __init__(self, ctx: TaskContext, total: int, unit: str, every_s: float = 5.0, done: int = 0):
        self.ctx, self.total, self.unit, self.every_s = ctx, total, unit, every_s
        self.start = self.last = time.monotonic()
        self.done = self.done_before = done
        self.counts: dict[str, float] = {}

    def update(self, n: int = 1, extra: str = "", **counts: float) -> None:
        self.done += n
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        now = time.monotonic()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.done_before) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        rates = "".join(f" {format_rate(value / elapsed)} {name}/s" for name, value in self.counts.items())
        self.ctx.say(f"{self.done}/{self.total} {self.unit} {format_rate(rate)}/s{rates} eta {format_seconds(eta)} "
                     f"{extra}".rstrip())


def format_rate(rate: float) -> str:
    """1,394,141 or 7.6: decimals only where they matter."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"


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


def record_files(directory: Path, skip: str = "", names: Iterable[str] | None = None) -> dict[str, dict]:
    """Every file below directory (but `skip`), or only those `names`, with its size and SHA-256."""
    paths = sorted(directory.rglob("*")) if names is None else [directory / name for name in names]
    return {str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": file_digest(path)}
            for path in paths if path.is_file() and path.name != skip}


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


def write_atomic(path: Path, write: Callable[[Any], Any]) -> None:
    """Write a file through a temporary one renamed into place (`write` gets the binary file): a
    reader never sees half a file, and the old one stays whole until the new one is complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def iter_jsonl(path, lines: Iterable[bytes] | None = None, first_line: int = 1) -> Iterable[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a local file (or of `lines`, read
    from elsewhere, whose first line is the file's line `first_line`); UserError names the file and line."""
    with contextlib.nullcontext(lines) if lines is not None else open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=first_line):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"{path}:{lineno}: invalid JSON line") from None


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
