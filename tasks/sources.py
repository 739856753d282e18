"""Corpus sources of the ingest step: finding them and reading their documents.

Local paths (globs) and pyarrow.fs URIs (file://, s3://, gs://, hdfs://) go through the same
code: a pyarrow filesystem and a path in it; a directory is read recursively.
Formats: .txt/.md/.py/.rst (one document per file), .jsonl, .csv/.tsv, .parquet (one per
record, text in `data.text_field`), any of them but Parquet compressed (.gz, .zst, .bz2, .lz4),
and Hugging Face datasets saved with `save_to_disk` (a directory with state.json and Arrow
IPC stream files, read with pyarrow: no `datasets` dependency). A file that cannot be read is a
UserError that names it and the problem. So is a bad record (a JSONL line that is not a JSON object
with a string text field, a CSV/TSV row whose fields do not match the header), unless the caller
passes a `skipped` list (data.on_error=skip): the record is then noted there and left out, and the
records around it keep their numbers. A text file is one document: undecodable bytes make it unreadable.

A `Part` is what one work unit of the ingest step reads (tasks/units.py): a whole source, the
lines that start in a byte range of an uncompressed JSONL file, or a run of row groups of a
Parquet file; pieces read through the same pyarrow filesystem as whole files.

    find_sources(pattern, key) -> [Source]
    read_source(source, text_field, skipped=None) -> [(source id, raw text)]
    read_part(part, text_field, skipped=None) -> ([(source id, raw text)], lines of a JSONL range)
"""
from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import tokenize as py_tokenize
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from tasks import common
from tasks.common import UserError, first_line

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
RECORD_SUFFIXES = {".jsonl", ".parquet", ".csv", ".tsv", ".arrow"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".lz4": "lz4"}
HF_STATE = "state.json"  # what `datasets.Dataset.save_to_disk` leaves beside its Arrow files
SCAN_BYTES = 1 << 16  # read at a time when looking for the end of a line
SKIP_HINT = "set data.on_error=skip to skip bad records"


@dataclass(frozen=True)
class Source:
    """One unit of input: a file (a local path or a URI), or one pydoc topic."""

    kind: str  # "file" or "pydoc"
    key: str
    size: int
    mtime_ns: int = 0


@dataclass(frozen=True)
class Part:
    """A source or a piece of one: with stop > 0, bytes [start, stop) of an uncompressed JSONL file
    (the lines that start there) or row groups [start, stop) of a Parquet file."""

    source: Source
    size: int
    """Input bytes it stands for."""
    start: int = 0
    stop: int = 0

    @property
    def whole(self) -> bool:
        return self.stop == 0


def split_suffix(path: str) -> tuple[str, str | None]:
    """(format suffix, compression or None) of a file name: 'a.jsonl.gz' -> ('.jsonl', 'gzip')."""
    suffixes = [s.lower() for s in PurePosixPath(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), COMPRESSIONS[suffixes[-1]]
    return (suffixes[-1] if suffixes else ""), None


def filesystem(key: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it (tasks/common.py), with a
    URI pyarrow cannot use as a UserError naming it."""
    try:
        return common.filesystem(key)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise UserError(f"{key}: not a usable URI ({first_line(exc)})") from None


def content_digest(path: str, key: str) -> str:
    """SHA-256 of a file's bytes (local or behind a URI): what a step's fingerprint holds of a file it
    reads, so that a file edited in place reruns the step. A file that cannot be read is a UserError
    naming the config key."""
    fs, inner = filesystem(path)
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(inner) as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{key}: cannot read '{path}' ({first_line(exc)})") from None
    return digest.hexdigest()[:16]


def find_sources(pattern: str, key: str) -> list[Source]:
    """Every file a glob (local) or URI names. A directory stands for the files below it (but hidden ones
    and names starting with '_'), or, if it holds a saved HF dataset, for its Arrow files."""
    fs, inner = filesystem(pattern)
    prefix = pattern.split("://")[0] + "://" if "://" in pattern else ""
    if prefix:
        infos = [fs.get_file_info(inner)]
    else:
        infos = fs.get_file_info(sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)))
    sources = []
    for info in infos:
        if info.type == pafs.FileType.Directory and fs.get_file_info(f"{info.path}/{HF_STATE}").type == pafs.FileType.File:
            infos_in = hf_data_files(fs, info.path, prefix)
        elif info.type == pafs.FileType.Directory:
            infos_in = [i for i in fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
                        if i.is_file and not i.base_name.startswith((".", "_"))]  # hidden files, _SUCCESS markers
        else:
            infos_in = [info] if info.type == pafs.FileType.File else []
        sources += [file_source(prefix + i.path, i, key) for i in infos_in]
    if not sources:
        raise UserError(f"{key}: no file matches '{pattern}'")
    return sources


def hf_data_files(fs: pafs.FileSystem, directory: str, prefix: str) -> list[pafs.FileInfo]:
    """The Arrow files of a dataset saved with `save_to_disk`, in the order state.json lists them."""
    try:
        with fs.open_input_stream(f"{directory}/{HF_STATE}") as stream:
            names = [entry["filename"] for entry in json.loads(stream.read())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{prefix}{directory}/{HF_STATE}: not a readable dataset state ({exc})") from None
    return fs.get_file_info([f"{directory}/{name}" for name in names])


def file_source(key: str, info: pafs.FileInfo, config_key: str) -> Source:
    suffix, _ = split_suffix(key)
    if suffix not in TEXT_SUFFIXES | RECORD_SUFFIXES:
        raise UserError(f"{config_key}: {key}: unsupported file type '{suffix}'")
    if info.type != pafs.FileType.File:
        raise UserError(f"{config_key}: {key}: no such file")
    return Source("file", key, info.size or 0, info.mtime_ns or 0)


def read_source(source: Source, text_field: str, skipped: list | None = None) -> list[tuple[str, str]]:
    """(source id, raw text) for every document of one source; UserError names the file and problem.
    With `skipped`, bad records are noted there instead (bad_record)."""
    if source.kind == "pydoc":
        from pydoc_data.topics import topics

        return [(f"pydoc:{source.key}", topics[source.key])]
    path, data = source.key, b""
    suffix, compression = split_suffix(path)
    try:
        if suffix in (".parquet", ".arrow"):
            return read_table_file(path, suffix, text_field)
        data = read_bytes(path, compression)
        if not data and suffix in RECORD_SUFFIXES:  # an empty text file is one empty document, counted as such
            raise UserError(f"{path}: empty file")
        if suffix == ".jsonl":
            return read_jsonl(path, data, text_field, skipped=skipped)
        if suffix in (".csv", ".tsv"):
            return read_csv(path, data, suffix, text_field, skipped)
        return [(path, data.decode(source_encoding(path, data)))]
    except (UnicodeDecodeError, SyntaxError) as exc:
        where = f" (byte {exc.start})" if isinstance(exc, UnicodeDecodeError) else ""
        raise UserError(f"{path}: not valid {source_encoding(path, data, strict=False)}{where}") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({describe(exc)})") from None


def read_part(part: Part, text_field: str, skipped: list | None = None) -> tuple[list[tuple[str, str]], int]:
    """(source id, raw text) of each document of a part, and for a JSONL range the number of lines it
    owns (0 otherwise). A range's source ids count lines from its own first line (which line of the
    file that is depends on the ranges before it: tasks/units.py shifts them); its errors name the
    file's own line (and its skipped records count lines as its source ids do)."""
    if part.whole:
        return read_source(part.source, text_field, skipped), 0
    path = part.source.key
    try:
        if split_suffix(path)[0] == ".parquet":
            return read_row_groups(path, part.start, part.stop, text_field), 0
        return read_jsonl_range(path, part.start, part.stop, text_field, skipped)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({describe(exc)})") from None


def read_jsonl_range(path: str, start: int, stop: int, text_field: str,
                     skipped: list | None = None) -> tuple[list[tuple[str, str]], int]:
    """The documents on the lines that start in bytes [start, stop) (the last one read to its end),
    numbered from 1, and how many lines that is."""
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as file:
        begin, end = line_start(file, start), line_start(file, stop)
        data = file.read_at(end - begin, begin) if begin < stop else b""
        try:
            docs = read_jsonl(path, data, text_field, skipped=skipped)
        except UserError:  # name the file's own line: count the lines before the range (only now)
            read_jsonl(path, data, text_field, first_line=count_newlines(file, begin) + 1)
            raise
    return docs, data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def line_start(file: pa.NativeFile, position: int) -> int:
    """Where the first line that starts at or after `position` begins (the file size if none does)."""
    if position <= 0:
        return 0
    size, offset = file.size(), position - 1  # a line starts at `position` if a newline ends the one before
    while offset < size:
        block = file.read_at(min(SCAN_BYTES, size - offset), offset)
        if (found := block.find(b"\n")) >= 0:
            return offset + found + 1
        offset += len(block)
    return size


def count_newlines(file: pa.NativeFile, end: int) -> int:
    """Newlines in the file's first `end` bytes."""
    count, offset = 0, 0
    while offset < end:
        block = file.read_at(min(1 << 24, end - offset), offset)
        count, offset = count + block.count(b"\n"), offset + len(block)
    return count


def parquet_row_group_bytes(path: str) -> list[int]:
    """Compressed bytes of each row group of a Parquet file (from its footer)."""
    import pyarrow.parquet as pq

    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as file:
        meta = pq.ParquetFile(file).metadata
        return [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                for g in range(meta.num_row_groups)]


def read_row_groups(path: str, start: int, stop: int, text_field: str) -> list[tuple[str, str]]:
    """Rows of row groups [start, stop) of a Parquet file, numbered as in the whole file."""
    import pyarrow.parquet as pq

    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as file:
        parquet = pq.ParquetFile(file)
        if text_field not in parquet.schema_arrow.names:
            raise UserError(f"{path}: no column '{text_field}' (data.text_field); "
                            f"columns: {parquet.schema_arrow.names}")
        first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(start))
        table = parquet.read_row_groups(list(range(start, stop)), columns=[text_field])
    return column_docs(path, table, text_field, first_row)


def describe(exc: Exception) -> str:
    """The first line of an exception's message (OSErrors: the text of their errno), for a one-line error."""
    if isinstance(exc, OSError) and exc.errno:  # pyarrow's strerror repeats the path
        return os.strerror(exc.errno)
    return first_line(exc)


def read_bytes(path: str, compression: str | None) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner, compression=compression) as stream:
        return stream.read()


def source_encoding(path: str, data: bytes, strict: bool = True) -> str:
    """UTF-8, except for Python files that declare another encoding (PEP 263)."""
    if split_suffix(path)[0] != ".py":
        return "utf-8"
    try:
        return py_tokenize.detect_encoding(io.BytesIO(data).readline)[0]
    except SyntaxError:
        if strict:
            raise
        return "Python source encoding"


def bad_record(path: str, number: int, reason: str, skipped: list | None) -> None:
    """A record that cannot be a document: a UserError naming its line (JSONL) or row (CSV), or, with
    `skipped` (data.on_error=skip), noted there as {"source": "<path>:<number>", "reason": ...}."""
    if skipped is None:
        raise UserError(f"{path}:{number}: {reason} ({SKIP_HINT})")
    skipped.append({"source": f"{path}:{number}", "reason": reason})


def read_jsonl(path: str, data: bytes, text_field: str, first_line: int = 1,
               skipped: list | None = None) -> list[tuple[str, str]]:
    """One document per non-blank line, ids `<path>:<line>` counted from first_line."""
    docs = []
    for lineno, raw in enumerate(io.BytesIO(data), start=first_line):
        if not raw.strip():
            continue
        text, problem = record_text(raw, text_field)
        if problem is None:
            docs.append((f"{path}:{lineno}", text))
        else:
            bad_record(path, lineno, problem, skipped)
    return docs


def record_text(raw: bytes, text_field: str) -> tuple[str, str | None]:
    """(text, None) of one JSONL line, or ("", why it is not a document) in a few words, without its content."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "", "invalid JSON line"
    if not isinstance(record, dict):
        return "", "not a JSON object"
    if not isinstance(record.get(text_field), str):
        return "", f"no string field '{text_field}' (data.text_field)"
    return record[text_field], None


def read_csv(path: str, data: bytes, suffix: str, text_field: str,
             skipped: list | None = None) -> list[tuple[str, str]]:
    """Rows of a CSV/TSV file with a header line (quoted values may span lines), ids `<path>:<row>` from 0.
    A row with more or fewer fields than the header is a bad record; the rows after it keep their numbers."""
    import pyarrow.csv as pacsv

    bad_rows = []  # a handler's exception is lost in pyarrow: note the rows, report them once read

    def invalid_row(row) -> str:
        bad_rows.append((row.number - 2, f"expected {row.expected_columns} fields, got {row.actual_columns}"))
        return "skip"  # row.number counts from 1, the header

    table = pacsv.read_csv(
        pa.BufferReader(data), read_options=pacsv.ReadOptions(use_threads=False),  # else row.number is None
        parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True,
                                         invalid_row_handler=invalid_row),
        convert_options=pacsv.ConvertOptions(column_types={text_field: pa.string()}))
    docs = column_docs(path, table, text_field)
    for row, reason in bad_rows:
        bad_record(path, row, reason, skipped)
    skipped_rows = {row for row, _ in bad_rows}
    rows = (row for row in itertools.count() if row not in skipped_rows)
    return [(f"{path}:{next(rows)}", text) for _, text in docs]


def read_table_file(path: str, suffix: str, text_field: str) -> list[tuple[str, str]]:
    """Parquet, or one Arrow IPC stream file of a saved Hugging Face dataset."""
    import pyarrow.parquet as pq

    fs, inner = filesystem(path)
    if suffix == ".parquet":
        schema = pq.read_schema(inner, filesystem=fs)
        if text_field not in schema.names:
            raise UserError(f"{path}: no column '{text_field}' (data.text_field); columns: {schema.names}")
        return column_docs(path, pq.read_table(inner, filesystem=fs, columns=[text_field]), text_field)
    with fs.open_input_stream(inner) as stream:
        return column_docs(path, pa.ipc.open_stream(stream).read_all(), text_field)


def column_docs(path: str, table: pa.Table, text_field: str, first_row: int = 0) -> list[tuple[str, str]]:
    """(path:row, text) of each row (the table's first being row first_row of the file); a missing or
    non-text column is a UserError. Nulls read as ''."""
    if text_field not in table.column_names:
        raise UserError(f"{path}: no column '{text_field}' (data.text_field); columns: {table.column_names}")
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise UserError(f"{path}: column '{text_field}' (data.text_field) holds {column.type}, not text")
    return [(f"{path}:{i}", text or "") for i, text in enumerate(column.to_pylist(), start=first_row)]
