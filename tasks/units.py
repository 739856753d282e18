"""Work units of the ingest step: how the corpus is cut into parallel tasks, and how a finished
unit is kept so that a rerun after a crash reuses it.

A unit is a list of parts (tasks/sources.py: Part) of about `data.shard_bytes` input bytes,
decided by the sources alone, never by the number of workers: small files are grouped, larger
uncompressed JSONL files are cut into byte ranges (a range owns the lines that start in it) and
larger Parquet files into runs of row groups; compressed files, CSV/TSV, saved HF datasets and
one-document files stay whole. Each unit is one parallel task, which writes its result into the
step's work directory (`TaskContext.work_dir`, kept across failed attempts):

    units.json                     the keys of this attempt's units, in corpus order
    units/<key>/docs.parquet       the documents that passed the filters (doc_id, text, source)
    units/<key>/parts.json         per part: counts by drop reason, examples, records skipped, error,
                                   lines, documents
    units/<key>/signatures.npy     MinHash signatures (near-dedup on; loaded with allow_pickle=False)
    units/<key>/_complete.json     written last: each file above with its size and SHA-256

A unit whose completion record matches its files is reused; one whose files are missing or
damaged is computed again, and the step says so. The merge (tasks/ingest.py) reads the units in
corpus order, after `whole_files` has made each file's parts read as the whole file would, so the
output does not depend on the unit size or the number of workers.

    plan(sources, shard_bytes) -> [Unit]
    run_units(units, compute, work_dir, ctx) -> ([part results] per unit, number reused)
    whole_files(part results) -> part results, as if every file had been read whole
    progress(work_dir) -> (units done, units total) or None
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.common import (Progress, TaskContext, UserError, files_problem, record_files, stable_hash,
                          write_atomic, write_json)
from tasks.mixing import Doc
from tasks.sources import Part, Source, parquet_row_group_bytes, split_suffix

AUTO_UNITS = 64  # shard_bytes=0: the corpus in about this many units, within the bounds below
AUTO_MIN_BYTES, AUTO_MAX_BYTES = 256 << 10, 64 << 20
PLAN, UNITS_DIR, RECORD = "units.json", "units", "_complete.json"
DOCS, PARTS, SIGNATURES = "docs.parquet", "parts.json", "signatures.npy"
DOCS_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("source", pa.string())])


@dataclass(frozen=True)
class Unit:
    """One parallel task's input: consecutive parts, in corpus order."""

    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return sum(part.size for part in self.parts)

    @property
    def key(self) -> str:
        """Names the unit's directory: the same parts (files unchanged) give the same key."""
        return stable_hash(json.dumps([[p.source.kind, p.source.key, p.source.size, p.source.mtime_ns, p.start,
                                        p.stop] for p in self.parts]))


def unit_bytes(sources: list[Source], shard_bytes: int) -> int:
    """The target size of a unit: shard_bytes, or (0) a 64th of the corpus within 256 KiB..64 MiB."""
    if shard_bytes > 0:
        return shard_bytes
    return min(max(sum(s.size for s in sources) // AUTO_UNITS, AUTO_MIN_BYTES), AUTO_MAX_BYTES)


def plan(sources: list[Source], shard_bytes: int) -> list[Unit]:
    """Consecutive parts (in source order) grouped into units of at most the target size (a part
    larger than that is a unit alone)."""
    target = unit_bytes(sources, shard_bytes)
    units, current, size = [], [], 0
    for part in (part for source in sources for part in split(source, target)):
        if current and size + part.size > target:
            units.append(Unit(tuple(current)))
            current, size = [], 0
        current.append(part)
        size += part.size
    return units + ([Unit(tuple(current))] if current else [])


def split(source: Source, target: int) -> list[Part]:
    """A source larger than target as pieces of about target bytes, where its format allows."""
    suffix, compression = split_suffix(source.key) if source.kind == "file" else ("", "not a file")
    if source.size <= target or compression:
        return [Part(source, source.size)]
    if suffix == ".jsonl":
        return [Part(source, min(target, source.size - start), start, min(start + target, source.size))
                for start in range(0, source.size, target)]
    if suffix == ".parquet":
        return row_group_parts(source, target)
    return [Part(source, source.size)]


def row_group_parts(source: Source, target: int) -> list[Part]:
    """Runs of consecutive row groups of about target bytes. A file whose footer cannot be read
    stays whole: reading it then reports the problem as for any file."""
    try:
        sizes = parquet_row_group_bytes(source.key)
    except (UserError, pa.ArrowException, OSError, ValueError):
        return [Part(source, source.size)]
    parts, start, size = [], 0, 0
    for group, group_size in enumerate(sizes):
        if group > start and size + group_size > target:
            parts.append(Part(source, size, start, group))
            start, size = group, 0
        size += group_size
    if not parts:
        return [Part(source, source.size)]
    return parts + [Part(source, size, start, len(sizes))]


@contextlib.contextmanager
def work_area(work_dir: Path | None):
    """The step's work directory, or (a context without one) a temporary directory."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="ingest-units-") as tmp:
        yield Path(tmp)


def run_units(units: list[Unit], compute: Callable, work_dir: Path, ctx: TaskContext) -> tuple[list[list[dict]], int]:
    """Every unit's part results, in order: those an earlier attempt finished are read back, the
    others computed in parallel tasks (`compute(unit) -> (part results, signatures or None)`)."""
    write_json(work_dir / PLAN, {"units": [unit.key for unit in units]})
    mirror = ctx.mirror  # where nodes share no directory, finished units are kept in the store too
    mirror.download(work_dir / UNITS_DIR, replace=False)
    todo = [unit for unit in units if not finished(work_dir / UNITS_DIR / unit.key, ctx)]
    reused = len(units) - len(todo)
    if reused:
        ctx.say(f"{reused} of {len(units)} work units were finished by an earlier attempt: reusing them")
    progress = Progress(ctx, len(units), "work units", done=reused)

    def finish(unit: Unit) -> dict:
        done = save(work_dir / UNITS_DIR / unit.key, *compute(unit), unit.size)
        mirror.upload(work_dir / UNITS_DIR / unit.key)
        return done

    ctx.parallel_map(finish, todo, on_result=lambda _, done: progress.update(1, docs=done["docs_in"], MB=done["bytes"] / 1e6))
    return [load(work_dir / UNITS_DIR / unit.key) for unit in units], reused


def finished(unit_dir: Path, ctx: TaskContext) -> bool:
    """Whether a unit's completion record exists and its files match it (if not, it says why)."""
    try:
        record = json.loads((unit_dir / RECORD).read_text())
        files = record["files"]
        problem = files_problem(unit_dir, files) or (None if {DOCS, PARTS} <= set(files) else "files are not listed")
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"its completion record is unreadable ({type(exc).__name__})"
    if problem:
        ctx.say(f"work unit {unit_dir.name}: {problem}; computing it again")
    return problem is None


def save(unit_dir: Path, parts: list[dict], signatures: np.ndarray | None, size: int) -> dict:
    """Write a unit's result, its completion record last; what progress needs (runs in the task).
    Each file is replaced whole, never removed first: a killed attempt's task that still runs for a
    moment writes the same bytes, and nobody reads half a file."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    docs = [doc for part in parts for doc in part["docs"]]
    table = pa.table([[getattr(d, n) for d in docs] for n in DOCS_SCHEMA.names], schema=DOCS_SCHEMA)
    write_atomic(unit_dir / DOCS, lambda fh: pq.write_table(table, fh))
    meta = [{**{k: v for k, v in part.items() if k != "docs"}, "num_docs": len(part["docs"])} for part in parts]
    write_atomic(unit_dir / PARTS, lambda fh: fh.write(json.dumps(meta).encode()))  # key order kept: examples as written
    if signatures is not None:
        write_atomic(unit_dir / SIGNATURES, lambda fh: np.save(fh, signatures, allow_pickle=False))
    names = [DOCS, PARTS] + ([SIGNATURES] if signatures is not None else [])
    write_json(unit_dir / RECORD, {"files": record_files(unit_dir, names=names)})
    return {"docs_in": sum(part["docs_in"] for part in parts), "bytes": size}


def load(unit_dir: Path) -> list[dict]:
    """A finished unit's part results: the documents (mixing.Doc) and signatures of each part."""
    parts = json.loads((unit_dir / PARTS).read_text())
    table = pq.read_table(unit_dir / DOCS)
    ids, texts, sources = (table.column(name).to_pylist() for name in DOCS_SCHEMA.names)
    signatures = np.load(unit_dir / SIGNATURES, allow_pickle=False) if (unit_dir / SIGNATURES).exists() else None
    offset = 0
    for part in parts:
        end = offset + part.pop("num_docs")
        part["docs"] = [Doc(ids[i], texts[i], sources[i], part["source"]) for i in range(offset, end)]
        part["signatures"] = signatures[offset:end] if signatures is not None else None
        offset = end
    return parts


def whole_files(parts: list[dict]) -> list[dict]:
    """Part results as if each file had been read whole: a file with a failed part is quarantined
    once, with its first error, and its other parts count for nothing; the line numbers of a JSONL
    range (counted from its first line), those of its skipped records too, become the file's own."""
    failed: dict[str, str] = {}
    for part in parts:
        if part["error"] is not None:
            failed.setdefault(part["source"], part["error"])
    lines_before: dict[str, int] = {}
    out = []
    for part in parts:
        source = part["source"]
        if source in failed:
            if failed[source] is not None:
                out.append({**part, "docs": [], "examples": {}, "docs_in": 0, "dropped": {}, "signatures": None,
                            "error": failed[source]})
                failed[source] = None  # listed once
            continue
        offset = lines_before.get(source, 0)
        lines_before[source] = offset + part["lines"]
        out.append(shift_lines(part, offset) if offset else part)
    return out


def shift_lines(part: dict, offset: int) -> dict:
    shift = lambda source_id: f"{source_id.rpartition(':')[0]}:{int(source_id.rpartition(':')[2]) + offset}"
    return {**part, "docs": [doc._replace(source=shift(doc.source)) for doc in part["docs"]],
            "examples": {reason: [{**e, "source": shift(e["source"])} for e in found]
                         for reason, found in part["examples"].items()},
            "skipped_examples": [{**e, "source": shift(e["source"])} for e in part["skipped_examples"]]}


def progress(work_dir: Path) -> tuple[int, int] | None:
    """(units finished, units planned) of an earlier attempt that stopped, if it finished any."""
    try:
        keys = json.loads((work_dir / PLAN).read_text())["units"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    done = sum((work_dir / UNITS_DIR / key / RECORD).is_file() for key in keys)
    return (done, len(keys)) if done else None
