"""ingest: corpus files (and Python's own text) -> normalised, filtered, deduplicated Parquet shards.

Every input document is accounted for: docs_in = docs_kept + sum of dropped_* counts,
and files that could not be read are either a clear error (data.on_error=raise) or
quarantined and listed in the manifest (data.on_error=skip).

    run(cfg: DataConfig, inputs={}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import glob
import io
import os
import re
import sysconfig
import tokenize as py_tokenize
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conf.schema import DataConfig
from tasks.common import TaskContext, UserError, hash_fraction, iter_jsonl, stable_hash, write_json

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
SHARD_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("source", pa.string())])
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_RUNS = re.compile(r"\n{3,}")
# The test suites hold deliberately malformed files (bad encodings, syntax errors): not corpus material.
STDLIB_SKIPPED_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class Source:
    """One unit of input: a file, or one pydoc topic."""

    kind: str  # "file" or "pydoc"
    key: str
    size: int


def _stdlib_files(exclude: list[str]) -> list[Source]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = set(exclude)
    sources = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        top = rel.parts[0].removesuffix(".py")
        if top in skipped or STDLIB_SKIPPED_DIRS & set(rel.parts[:-1]):
            continue
        sources.append(Source("file", str(path), path.stat().st_size))
    return sources


def _pydoc_topics(exclude: list[str]) -> list[Source]:
    from pydoc_data.topics import topics

    return [Source("pydoc", key, len(text)) for key, text in sorted(topics.items())]


BUILTIN_CORPORA = {"python_stdlib": _stdlib_files, "pydoc_topics": _pydoc_topics}


def list_sources(cfg: DataConfig) -> list[Source]:
    """Expand globs and builtin corpora; raise UserError naming the key for anything missing."""
    if not cfg.paths and not cfg.builtin:
        raise UserError("data: neither data.paths nor data.builtin names a corpus")
    sources: list[Source] = []
    for i, pattern in enumerate(cfg.paths):
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise UserError(f"data.paths[{i}]: no file matches '{pattern}'")
        for path in matches:
            suffix = Path(path).suffix.lower()
            if suffix not in TEXT_SUFFIXES | RECORD_SUFFIXES:
                raise UserError(f"data.paths[{i}]: {path}: unsupported file type '{suffix}'")
            sources.append(Source("file", path, os.path.getsize(path)))
    for name in cfg.builtin:
        if name not in BUILTIN_CORPORA:
            raise UserError(f"data.builtin: unknown corpus '{name}' (known: {', '.join(BUILTIN_CORPORA)})")
        sources.extend(BUILTIN_CORPORA[name](cfg.stdlib_exclude))
    return sample_sources(sorted(set(sources), key=lambda s: (s.kind, s.key)), cfg.max_bytes, cfg.seed)


def sources_digest(cfg: DataConfig) -> str:
    """Identity of the input files (name, size, modification time): a changed corpus reruns ingest."""
    parts = []
    for source in list_sources(cfg):
        mtime = os.stat(source.key).st_mtime_ns if source.kind == "file" else 0
        parts.append(f"{source.kind}:{source.key}:{source.size}:{mtime}")
    return stable_hash("\n".join(parts))


def sample_sources(sources: list[Source], max_bytes: int, seed: int) -> list[Source]:
    """A seeded sample of whole sources up to about max_bytes, returned in a stable order."""
    if max_bytes <= 0:
        return sources
    chosen, total = [], 0
    for source in sorted(sources, key=lambda s: hash_fraction(f"{s.kind}:{s.key}", seed)):
        if total >= max_bytes:
            break
        chosen.append(source)
        total += source.size
    return sorted(chosen, key=lambda s: (s.kind, s.key))


def normalize(text: str) -> str:
    """Unicode NFC, one newline convention, no control characters or trailing spaces, <=2 blank lines.

    Indentation is kept: code is part of the corpus.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def read_source(source: Source, text_field: str) -> list[tuple[str, str]]:
    """(source id, raw text) for every document of one source; UserError names the file and problem."""
    if source.kind == "pydoc":
        from pydoc_data.topics import topics

        return [(f"pydoc:{source.key}", topics[source.key])]
    path = source.key
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, text_field)
        if suffix == ".parquet":
            return _read_parquet(path, text_field)
        with open(path, "rb") as fh:
            data = fh.read()
        return [(path, data.decode(source_encoding(path, data)))]
    except (UnicodeDecodeError, SyntaxError) as exc:
        where = f" (byte {exc.start})" if isinstance(exc, UnicodeDecodeError) else ""
        raise UserError(f"{path}: not valid {source_encoding(path, data, strict=False)}{where}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def source_encoding(path: str, data: bytes, strict: bool = True) -> str:
    """UTF-8, except for Python files that declare another encoding (PEP 263)."""
    if not path.endswith(".py"):
        return "utf-8"
    try:
        return py_tokenize.detect_encoding(io.BytesIO(data).readline)[0]
    except SyntaxError:
        if strict:
            raise
        return "Python source encoding"


def _read_jsonl(path: str, text_field: str) -> list[tuple[str, str]]:
    docs = []
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{path}:{lineno}: no string field '{text_field}' (data.text_field)")
        docs.append((f"{path}:{lineno}", record[text_field]))
    return docs


def _read_parquet(path: str, text_field: str) -> list[tuple[str, str]]:
    try:
        schema = pq.read_schema(path)
    except pa.ArrowException as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    if text_field not in schema.names:
        raise UserError(f"{path}: no column '{text_field}' (data.text_field); columns: {schema.names}")
    column = pq.read_table(path, columns=[text_field]).column(0).to_pylist()
    return [(f"{path}:{i}", text or "") for i, text in enumerate(column)]


def process_sources(sources: list[Source], cfg: DataConfig) -> dict:
    """Read, normalise and filter a chunk of sources (runs as one parallel task)."""
    docs, dropped, quarantined, docs_in = [], {"empty": 0, "too_short": 0}, [], 0
    for source in sources:
        try:
            raw_docs = read_source(source, cfg.text_field)
        except UserError as exc:
            if cfg.on_error != "skip":
                raise
            quarantined.append({"source": source.key, "error": str(exc)})
            continue
        for source_id, raw in raw_docs:
            docs_in += 1
            text = normalize(raw)
            if not text:
                dropped["empty"] += 1
            elif len(text) < cfg.min_chars:
                dropped["too_short"] += 1
            else:
                docs.append((stable_hash(text), text, source_id))
    return {"docs": docs, "dropped": dropped, "quarantined": quarantined, "docs_in": docs_in}


def _chunks(sources: list[Source], num_chunks: int) -> list[list[Source]]:
    size = max(1, -(-len(sources) // max(num_chunks, 1)))
    return [sources[i : i + size] for i in range(0, len(sources), size)]


def run(cfg: DataConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    sources = list_sources(cfg)
    ctx.say(f"{len(sources)} sources, {sum(s.size for s in sources) / 1e6:.1f} MB")
    results = ctx.parallel_map(lambda chunk: process_sources(chunk, cfg), _chunks(sources, ctx.num_cpus * 4))

    seen: set[str] = set()
    kept, dropped, quarantined, docs_in = [], {"empty": 0, "too_short": 0, "duplicate": 0}, [], 0
    for result in results:  # in source order, so the output does not depend on the number of workers
        docs_in += result["docs_in"]
        quarantined += result["quarantined"]
        for reason, count in result["dropped"].items():
            dropped[reason] += count
        for doc in result["docs"]:
            if doc[0] in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(doc[0])
            kept.append(doc)
    if not kept:
        raise UserError(f"data: no usable documents in {len(sources)} sources ({docs_in} read, dropped {dropped})")

    num_shards = write_shards(kept, out_dir, cfg.docs_per_shard)
    write_json(out_dir / "quarantine.json", quarantined)
    metrics = {
        "sources": len(sources), "docs_in": docs_in, "docs_kept": len(kept), "shards": num_shards,
        "bytes_kept": sum(len(d[1].encode("utf-8")) for d in kept), "files_quarantined": len(quarantined),
        **{f"dropped_{reason}": count for reason, count in dropped.items()},
    }
    assert docs_in == len(kept) + sum(dropped.values()), "document accounting does not add up"
    ctx.say(f"kept {len(kept)} of {docs_in} documents; dropped {dropped}; quarantined files {len(quarantined)}")
    return metrics


def write_shards(docs: list[tuple[str, str, str]], out_dir: Path, docs_per_shard: int) -> int:
    shards_dir = out_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    num_shards = 0
    for start in range(0, len(docs), docs_per_shard):
        part = docs[start : start + docs_per_shard]
        table = pa.table([list(col) for col in zip(*part)], schema=SHARD_SCHEMA)
        pq.write_table(table, shards_dir / f"part-{num_shards:05d}.parquet")
        num_shards += 1
    return num_shards


def read_shards(ingest_dir: Path) -> list[Path]:
    return sorted((ingest_dir / "shards").glob("part-*.parquet"))
