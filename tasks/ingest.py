"""ingest: corpus files (and Python's own text) -> normalised, filtered, deduplicated Parquet shards.

The corpus is cut into work units of about data.shard_bytes of input (tasks/units.py: small files
grouped, large JSONL and Parquet files split), decided by the sources alone. One parallel task per
unit reads (tasks/sources.py), normalises and filters (tasks/quality.py) its documents and computes
MinHash signatures, and keeps its result in the step's work directory, so a rerun after a crash
computes only the units not finished yet. Then, over the whole corpus in source order (so the
output does not depend on the unit size or the number of workers), exact duplicates and, with
data.near_dedup.enabled, near-duplicates (tasks/dedup.py) are dropped and the per-source
weights applied (tasks/mixing.py). Every input document is accounted for: docs_in = docs_kept +
sum of dropped_* counts, with a few dropped documents per reason in dropped_examples.jsonl and
the bytes written per source in mixture.json. Files that could not be read and bad records (a
malformed JSONL line or CSV row: tasks/sources.py) are either a clear error (data.on_error=raise)
or (data.on_error=skip) listed in quarantine.json: whole files under "files", and per file the
number of records skipped and the first data.examples_per_reason of them (line or row, reason)
under "skipped_records"; the other records of such a file are kept. Skipped records are not
documents: they are counted in records_skipped, not in docs_in.

    run(cfg: DataConfig, inputs={}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import re
import sysconfig
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conf.schema import DataConfig
from tasks import dedup, file_digests, mixing, quality, units
from tasks.common import TaskContext, UserError, hash_fraction, stable_hash, write_json, write_jsonl
from tasks.sources import TEXT_SUFFIXES, Part, Source, find_sources, read_part, split_suffix

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_RUNS = re.compile(r"\n{3,}")
# The test suites hold deliberately malformed files (bad encodings, syntax errors): not corpus material.
STDLIB_SKIPPED_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test"}
REASONS = ("empty", "too_short", *quality.REASONS, "duplicate", "near_duplicate", "subsampled")
EXAMPLE_CHARS = 2000  # text kept of each dropped example


def _stdlib_files(exclude: list[str]) -> list[Source]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = set(exclude)
    sources = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        top = rel.parts[0].removesuffix(".py")
        if top in skipped or STDLIB_SKIPPED_DIRS & set(rel.parts[:-1]):
            continue
        stat = path.stat()
        sources.append(Source("file", str(path), stat.st_size, stat.st_mtime_ns))
    return sources


def _pydoc_topics(exclude: list[str]) -> list[Source]:
    from pydoc_data.topics import topics

    return [Source("pydoc", key, len(text)) for key, text in sorted(topics.items())]


BUILTIN_CORPORA = {"python_stdlib": _stdlib_files, "pydoc_topics": _pydoc_topics}


def source_groups(cfg: DataConfig) -> list[mixing.Group]:
    """Each data.paths entry and builtin corpus with its sources; UserError naming the key for anything missing."""
    if not cfg.paths and not cfg.builtin:
        raise UserError("data: neither data.paths nor data.builtin names a corpus")
    groups = [mixing.Group(f"paths.{i}", cfg.weights[i] if cfg.weights else 1.0,
                           find_sources(pattern, f"data.paths[{i}]")) for i, pattern in enumerate(cfg.paths)]
    for name in cfg.builtin:
        if name not in BUILTIN_CORPORA:
            raise UserError(f"data.builtin: unknown corpus '{name}' (known: {', '.join(BUILTIN_CORPORA)})")
        groups.append(mixing.Group(f"builtin.{name}", 1.0, BUILTIN_CORPORA[name](cfg.stdlib_exclude)))
    return groups


def list_sources(cfg: DataConfig) -> list[Source]:
    """Every source of the corpus (a seeded sample of them up to data.max_bytes), in a stable order."""
    sources = {source for group in source_groups(cfg) for source in group.sources}
    return sample_sources(sorted(sources, key=lambda s: (s.kind, s.key)), cfg.max_bytes, cfg.seed)


def sources_digest(cfg: DataConfig) -> str:
    """Identity of the input files: a local file by its name, size and bytes (tasks/file_digests.py:
    a file copied or touched with the same bytes keeps it), a remote one by name, size and
    modification time. A changed corpus reruns ingest."""
    chosen = list_sources(cfg)
    local = file_digests.local_digests([s.key for s in chosen if s.kind == "file" and "://" not in s.key])
    return stable_hash("\n".join(f"{s.kind}:{s.key}:{s.size}:{local.get(s.key, s.mtime_ns)}" for s in chosen))


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


def drop_reason(text: str, cfg: DataConfig) -> str | None:
    """Why a normalised document is dropped before dedup (empty, too short, a quality filter), or None."""
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    return quality.failed_filter(text, cfg.filters)


def process_unit(unit: units.Unit, cfg: DataConfig) -> tuple[list[dict], np.ndarray | None]:
    """One parallel task: each part's results, and the MinHash signatures of the documents kept (near-dedup on)."""
    parts = [process_part(part, cfg) for part in unit.parts]
    texts = [doc.text for part in parts for doc in part["docs"]]
    return parts, dedup.signatures(texts, cfg.near_dedup) if cfg.near_dedup.enabled else None


def process_part(part: Part, cfg: DataConfig) -> dict:
    """Read, normalise and filter one part (a file, or a piece of one): the documents kept, counts and
    examples by drop reason; an unreadable file or a bad record is an error, or (data.on_error=skip)
    recorded as one (the records skipped counted, the first few kept as examples)."""
    result = {"source": part.source.key, "docs": [], "docs_in": 0, "error": None, "lines": 0,
              "dropped": dict.fromkeys(REASONS, 0), "examples": {reason: [] for reason in REASONS},
              "records_skipped": 0, "skipped_examples": []}
    skipped = [] if cfg.on_error == "skip" else None  # None: the first bad record raises
    try:
        raw_docs, result["lines"] = read_part(part, cfg.text_field, skipped)
    except UserError as exc:
        if skipped is None:
            raise
        return {**result, "error": str(exc)}
    if skipped:
        result["records_skipped"], result["skipped_examples"] = len(skipped), skipped[: cfg.examples_per_reason]
    dropped, examples = result["dropped"], result["examples"]
    for source_id, text in split_documents(raw_docs, part, cfg.text_chunk_chars):
        result["docs_in"] += 1
        reason = drop_reason(text, cfg)
        if reason is None:
            result["docs"].append(mixing.Doc(stable_hash(text), text, source_id, part.source.key))
            continue
        dropped[reason] += 1
        if len(examples[reason]) < cfg.examples_per_reason:
            examples[reason].append(example(reason, source_id, text))
    return result


def split_documents(raw_docs: list[tuple[str, str]], part: Part, chunk_chars: int) -> list[tuple[str, str]]:
    """Normalised documents of a part. With data.text_chunk_chars, a text file (.txt/.md/...) becomes
    several documents: consecutive paragraphs (blank-line separated) up to about that many characters
    each, ids `<file>#<n>`; record files (JSONL, CSV, Parquet) keep one document per record."""
    docs = [(source_id, normalize(raw)) for source_id, raw in raw_docs]
    if not chunk_chars or not is_text_file(part.source):
        return docs
    return [(f"{source_id}#{n}", chunk) for source_id, text in docs
            for n, chunk in enumerate(paragraph_chunks(text, chunk_chars))]


def is_text_file(source: Source) -> bool:
    return source.kind == "file" and split_suffix(source.key)[0] in TEXT_SUFFIXES


def paragraph_chunks(text: str, chunk_chars: int) -> list[str]:
    """Whole paragraphs grouped up to chunk_chars. A longer paragraph is cut at its line breaks (a file of
    one sentence a line, no blank lines), and a line longer than chunk_chars is a chunk of its own. An
    empty text stays one (empty) document, so it is counted as dropped."""
    chunks, current = [], ""
    for paragraph in text.split("\n\n"):
        pieces = [(paragraph, "\n\n")] if len(paragraph) <= chunk_chars else \
            [(line, "\n\n" if i == 0 else "\n") for i, line in enumerate(paragraph.split("\n"))]
        for piece, separator in pieces:
            if current and len(current) + len(separator) + len(piece) > chunk_chars:
                chunks.append(current)
                current = piece
            else:
                current = current + separator + piece if current else piece
    return chunks + [current]


def example(reason: str, source_id: str, text: str, **extra) -> dict:
    return {"reason": reason, "source": source_id, "chars": len(text), "text": text[:EXAMPLE_CHARS], **extra}


def run(cfg: DataConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    sources = list_sources(cfg)
    plan = units.plan(sources, cfg.shard_bytes)
    ctx.say(f"{len(sources)} sources, {sum(s.size for s in sources) / 1e6:.1f} MB, in {len(plan)} work units "
            f"of up to {units.unit_bytes(sources, cfg.shard_bytes) / 1e6:.2f} MB")
    with units.work_area(ctx.work_dir) as work_dir:
        results, reused = units.run_units(plan, lambda unit: process_unit(unit, cfg), work_dir, ctx)
    parts = units.whole_files([part for unit_parts in results for part in unit_parts])
    merged = merge_results(parts, cfg.examples_per_reason)  # in source order: independent of the units
    kept, dropped, examples = merged["kept"], merged["dropped"], merged["examples"]
    if cfg.near_dedup.enabled:
        kept = remove_near_duplicates(kept, merged["signatures"], cfg, dropped, examples)
    groups = source_groups(cfg)
    kept, repeats = mixing.mix(kept, groups, cfg.seed)
    dropped["subsampled"] = merged["num_unique"] - dropped["near_duplicate"] - len(kept)
    docs_in, quarantined, skipped = merged["docs_in"], merged["quarantined"], merged["skipped"]
    if not kept:
        raise UserError(f"data: no usable documents in {len(sources)} sources ({docs_in} read, dropped "
                        f"{({k: v for k, v in dropped.items() if v})}){drop_hint(dropped)}")

    num_shards = write_shards(kept + repeats, out_dir, cfg.docs_per_shard)
    write_json(out_dir / "quarantine.json", {"files": quarantined, "skipped_records": skipped})
    write_jsonl(out_dir / "dropped_examples.jsonl", [e for reason in REASONS for e in examples[reason]])
    mixture = mixing.report(groups, kept + repeats)
    write_json(out_dir / "mixture.json", mixture)
    metrics = {
        "sources": len(sources), "docs_in": docs_in, "docs_kept": len(kept), "shards": num_shards,
        "docs_written": len(kept) + len(repeats), "bytes_written": sum(g["bytes_written"] for g in mixture),
        "files_quarantined": len(quarantined), "records_skipped": sum(s["records_skipped"] for s in skipped),
        **{f"dropped_{reason}": count for reason, count in dropped.items()},
        **{f"mix_share_{g['group']}": g["share"] for g in mixture},
        "units_total": len(plan), "units_reused": reused,  # how the work was cut and resumed, not the result
    }
    assert docs_in == len(kept) + sum(dropped.values()), "document accounting does not add up"
    ctx.say(f"kept {len(kept)} of {docs_in} documents; dropped {({k: v for k, v in dropped.items() if v})}; "
            f"quarantined files {len(quarantined)}; skipped records {metrics['records_skipped']}"
            f"{drop_hint(dropped) if dropped['too_long'] else ''}")
    return metrics


DROP_KEYS = {
    "too_long": "data.filters.max_doc_chars (or cut big text files into paragraph documents with data.text_chunk_chars)",
    "too_short": "data.min_chars", "empty": "data.paths (the files hold no text)",
    "mean_word_length": "data.filters.min_mean_word_length / max_mean_word_length",
    "symbol_ratio": "data.filters.max_symbol_ratio", "digit_ratio": "data.filters.max_digit_ratio",
    "repeated_lines": "data.filters.max_repeated_line_fraction",
    "repeated_ngrams": "data.filters.max_repeated_ngram_fraction",
    "language": "data.filters.languages / min_language_score",
}
"""The setting that lets through what each drop reason holds back."""


def drop_hint(dropped: dict) -> str:
    """'; most were dropped as <reason>: see <key>' for the biggest reason with a setting behind it."""
    counted = [(count, reason) for reason, count in dropped.items() if count and reason in DROP_KEYS]
    if not counted:
        return ""
    _, reason = max(counted)
    return f"; most were dropped as {reason}: see {DROP_KEYS[reason]}"


def merge_results(results: list[dict], examples_per_reason: int) -> dict:
    """Sum the parts' counts (in corpus order) and drop exact duplicates (same normalised text) across all of them."""
    first_source: dict[str, str] = {}
    kept, signatures, quarantined, skipped, docs_in = [], [], [], [], 0
    dropped, examples = dict.fromkeys(REASONS, 0), {reason: [] for reason in REASONS}
    for result in results:
        if result["error"] is not None:
            quarantined.append({"source": result["source"], "error": result["error"]})
            continue
        docs_in += result["docs_in"]
        if result["records_skipped"]:
            add_skipped(skipped, result, examples_per_reason)
        for reason in REASONS:
            dropped[reason] += result["dropped"][reason]
            examples[reason] += result["examples"][reason][: examples_per_reason - len(examples[reason])]
        for index, doc in enumerate(result["docs"]):
            if doc.doc_id in first_source:
                dropped["duplicate"] += 1
                if len(examples["duplicate"]) < examples_per_reason:
                    examples["duplicate"].append(
                        example("duplicate", doc.source, doc.text, duplicate_of=first_source[doc.doc_id]))
                continue
            first_source[doc.doc_id] = doc.source
            kept.append(doc)
            if result["signatures"] is not None:
                signatures.append(result["signatures"][index])
    return {"kept": kept, "signatures": signatures, "dropped": dropped, "examples": examples,
            "quarantined": quarantined, "skipped": skipped, "docs_in": docs_in, "num_unique": len(kept)}


def add_skipped(skipped: list[dict], result: dict, examples_per_file: int) -> None:
    """Count a part's skipped records in its file's entry (a file's parts come one after the other)."""
    if not skipped or skipped[-1]["source"] != result["source"]:
        skipped.append({"source": result["source"], "records_skipped": 0, "examples": []})
    entry = skipped[-1]
    entry["records_skipped"] += result["records_skipped"]
    entry["examples"] += result["skipped_examples"][: examples_per_file - len(entry["examples"])]


def remove_near_duplicates(kept: list, signatures: list, cfg: DataConfig, dropped: dict, examples: dict) -> list:
    """MinHash LSH over the whole corpus (tasks/dedup.py); the first document of each similar group stays."""
    sigs = np.stack(signatures) if signatures else np.zeros((0, cfg.near_dedup.num_perm), dtype=np.uint32)
    drop = dedup.near_duplicates(sigs, cfg.near_dedup)
    dropped["near_duplicate"] += len(drop)
    for index, kept_index in list(drop.items())[: cfg.examples_per_reason]:
        examples["near_duplicate"].append(
            example("near_duplicate", kept[index].source, kept[index].text, duplicate_of=kept[kept_index].source))
    return [doc for index, doc in enumerate(kept) if index not in drop]


def write_shards(docs: list[mixing.Doc], out_dir: Path, docs_per_shard: int) -> int:
    shards_dir = out_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    num_shards = 0
    for start in range(0, len(docs), docs_per_shard):
        part = docs[start : start + docs_per_shard]
        table = pa.table([[getattr(doc, name) for doc in part] for name in units.DOCS_SCHEMA.names],
                         schema=units.DOCS_SCHEMA)  # a shard holds documents as a work unit does
        pq.write_table(table, shards_dir / f"part-{num_shards:05d}.parquet")
        num_shards += 1
    return num_shards


def read_shards(ingest_dir: Path) -> list[Path]:
    return sorted((ingest_dir / "shards").glob("part-*.parquet"))
