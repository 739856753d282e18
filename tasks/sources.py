"""Corpus sources of the ingest step: finding them and reading their documents.

Local paths (globs) and pyarrow.fs URIs (file://, s3://, gs://, hdfs://) go through the same
code: a pyarrow filesystem and a path in it; a directory is read recursively.
Formats: .txt/.md/.py/.rst (one document per file), .jsonl, .csv/.tsv, .parquet (one per
record, text in `data.text_field`), any of them but Parquet compressed (.gz, .zst, .bz2, .lz4),
and Hugging Face datasets saved with `save_to_disk` (a directory with state.json and Arrow
IPC stream files, read with pyarrow: no `datasets` dependency). A file that cannot be read is a
UserError that names it and the problem.

    find_sources(pattern, key) -> [Source]
    read_source(source, text_field) -> [(source id, raw text)]
"""
from __future__ import annotations

import glob
import io
import json
import os
import tokenize as py_tokenize
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from tasks.common import UserError, iter_jsonl

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
RECORD_SUFFIXES = {".jsonl", ".parquet", ".csv", ".tsv", ".arrow"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".lz4": "lz4"}
HF_STATE = "state.json"  # what `datasets.Dataset.save_to_disk` leaves beside its Arrow files


@dataclass(frozen=True)
class Source:
    """One unit of input: a file (a local path or a URI), or one pydoc topic."""

    kind: str  # "file" or "pydoc"
    key: str
    size: int
    mtime_ns: int = 0


def split_suffix(path: str) -> tuple[str, str | None]:
    """(format suffix, compression or None) of a file name: 'a.jsonl.gz' -> ('.jsonl', 'gzip')."""
    suffixes = [s.lower() for s in PurePosixPath(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), COMPRESSIONS[suffixes[-1]]
    return (suffixes[-1] if suffixes else ""), None


def filesystem(key: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it."""
    if "://" in key:
        try:
            return pafs.FileSystem.from_uri(key)
        except (pa.ArrowException, ValueError, OSError) as exc:
            raise UserError(f"{key}: not a usable URI ({str(exc).splitlines()[0]})") from None
    return pafs.LocalFileSystem(), os.path.abspath(key)


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


def read_source(source: Source, text_field: str) -> list[tuple[str, str]]:
    """(source id, raw text) for every document of one source; UserError names the file and problem."""
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
            return read_jsonl(path, data, text_field)
        if suffix in (".csv", ".tsv"):
            return read_csv(path, data, suffix, text_field)
        return [(path, data.decode(source_encoding(path, data)))]
    except (UnicodeDecodeError, SyntaxError) as exc:
        where = f" (byte {exc.start})" if isinstance(exc, UnicodeDecodeError) else ""
        raise UserError(f"{path}: not valid {source_encoding(path, data, strict=False)}{where}") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({describe(exc)})") from None


def describe(exc: Exception) -> str:
    """The first line of an exception's message (OSErrors: the text of their errno), for a one-line error."""
    if isinstance(exc, OSError) and exc.errno:  # pyarrow's strerror repeats the path
        return os.strerror(exc.errno)
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


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


def read_jsonl(path: str, data: bytes, text_field: str) -> list[tuple[str, str]]:
    docs = []
    for lineno, record in iter_jsonl(path, io.BytesIO(data)):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{path}:{lineno}: no string field '{text_field}' (data.text_field)")
        docs.append((f"{path}:{lineno}", record[text_field]))
    return docs


def read_csv(path: str, data: bytes, suffix: str, text_field: str) -> list[tuple[str, str]]:
    """Rows of a CSV/TSV file with a header line (quoted values may span lines)."""
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(
        pa.BufferReader(data),
        parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={text_field: pa.string()}))
    return column_docs(path, table, text_field)


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


def column_docs(path: str, table: pa.Table, text_field: str) -> list[tuple[str, str]]:
    """(path:row, text) of each row; a missing or non-text column is a UserError. Nulls read as ''."""
    if text_field not in table.column_names:
        raise UserError(f"{path}: no column '{text_field}' (data.text_field); columns: {table.column_names}")
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise UserError(f"{path}: column '{text_field}' (data.text_field) holds {column.type}, not text")
    return [(f"{path}:{i}", text or "") for i, text in enumerate(column.to_pylist())]
