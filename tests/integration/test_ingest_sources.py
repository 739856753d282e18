"""Every corpus format and location the ingest step reads, and how it treats unreadable files."""
from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pytest

from conf.schema import DataConfig
from tasks import ingest, sources
from tasks.common import TaskContext, UserError

TEXTS = ["A first document of the corpus.", "A second document, somewhat longer than the first."]


def write_compressed(path, data: bytes, codec: str) -> None:
    with pa.CompressedOutputStream(str(path), codec) as stream:
        stream.write(data)


def jsonl_bytes(texts, field="text") -> bytes:
    return "\n".join(json.dumps({field: t}) for t in texts).encode()


def save_to_disk_layout(directory, texts) -> None:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files listed in state.json."""
    directory.mkdir()
    names = []
    for i, part in enumerate([texts[:1], texts[1:]]):
        names.append(f"data-{i:05d}-of-00002.arrow")
        table = pa.table({"text": part, "id": list(range(len(part)))})
        with pa.ipc.new_stream(str(directory / names[-1]), table.schema) as writer:
            writer.write_table(table)
    (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))


def ingest_rows(cfg: DataConfig, out_dir) -> tuple[dict, list[dict]]:
    """The ingest step's metrics and the rows of its shards."""
    out_dir.mkdir()
    metrics = ingest.run(cfg, {}, out_dir, TaskContext("ingest"))
    import pyarrow.parquet as pq

    return metrics, [row for shard in ingest.read_shards(out_dir) for row in pq.read_table(shard).to_pylist()]


def ingested_texts(cfg: DataConfig, out_dir) -> list[str]:
    return [row["text"] for row in ingest_rows(cfg, out_dir)[1]]


@pytest.mark.parametrize("name, writer", [
    ("a.jsonl.gz", lambda p: write_compressed(p, jsonl_bytes(TEXTS), "gzip")),
    ("a.jsonl.zst", lambda p: write_compressed(p, jsonl_bytes(TEXTS), "zstd")),
    ("a.csv", lambda p: p.write_text('body,n\n"' + TEXTS[0] + '",1\n"' + TEXTS[1] + '",2\n')),
    ("a.tsv.gz", lambda p: write_compressed(p, f"n\tbody\n1\t{TEXTS[0]}\n2\t{TEXTS[1]}\n".encode(), "gzip")),
    ("hf_dataset", lambda p: save_to_disk_layout(p, TEXTS)),
])
def test_each_format_is_read(tmp_path, name, writer):
    writer(tmp_path / name)
    field = "body" if ".csv" in name or ".tsv" in name else "text"
    assert ingested_texts(DataConfig(paths=[str(tmp_path / name)], text_field=field), tmp_path / "out") == TEXTS


def test_compressed_text_and_file_uris_take_the_same_path(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_compressed(corpus / "one.txt.gz", TEXTS[0].encode(), "gzip")
    (corpus / "sub" / "two.md").write_text(TEXTS[1])
    (corpus / ".hidden.txt").write_text("not corpus material")
    local = ingested_texts(DataConfig(paths=[f"{corpus}/**/*.gz", str(corpus / "sub")]), tmp_path / "local")
    uri = ingested_texts(DataConfig(paths=[f"file://{corpus}"]), tmp_path / "uri")
    assert sorted(local) == sorted(uri) == sorted(TEXTS)
    assert ingest.list_sources(DataConfig(paths=[f"file://{corpus}/sub/two.md"]))[0].key == f"file://{corpus}/sub/two.md"


BAD_FILES = {
    "truncated.jsonl.gz": (lambda p: p.write_bytes(gzip.compress(jsonl_bytes(TEXTS * 50))[:60]), "cannot read"),
    "corrupt.txt.gz": (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate"), "cannot read"),
    "nocolumn.csv": (lambda p: p.write_text("title,n\nhello,1\n"), r"no column 'text' \(data.text_field\)"),
    "empty.jsonl": (lambda p: p.write_bytes(b""), "empty file"),
    "latin1.txt.gz": (lambda p: write_compressed(p, "caf\xe9 au lait, a document".encode("latin-1"), "gzip"),
                      r"not valid utf-8 \(byte 3\)"),
    "broken.parquet": (lambda p: p.write_bytes(b"PAR1 not really parquet PAR1"), "cannot read"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_a_clear_error_or_quarantined(tmp_path, name):
    write, message = BAD_FILES[name]
    write(tmp_path / name)
    (tmp_path / "good.txt").write_text(TEXTS[0])
    cfg = DataConfig(paths=[str(tmp_path / name), str(tmp_path / "good.txt")])
    with pytest.raises(UserError, match=rf"^{tmp_path / name}: {message}") as error:
        ingested_texts(cfg, tmp_path / "raise")
    assert "\n" not in str(error.value)
    cfg.on_error = "skip"
    assert ingested_texts(cfg, tmp_path / "skip") == [TEXTS[0]]
    quarantined = json.loads((tmp_path / "skip" / "quarantine.json").read_text())
    assert [q["source"] for q in quarantined["files"]] == [str(tmp_path / name)]
    assert quarantined["skipped_records"] == []


def test_one_bad_jsonl_line_is_an_error_or_skipped_alone(tmp_path):
    """Issue 17: 29 good lines and a malformed one. raise: one line naming the file and line and the
    setting; skip: the 29 documents are kept with their own line numbers, the bad line is counted."""
    lines = [json.dumps({"text": f"Document number {i} of the corpus, long enough."}) for i in range(30)]
    lines[12] = '{"text": "cut off'
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(paths=[str(path)])
    message = rf"^{path}:13: invalid JSON line \(set data.on_error=skip to skip bad records\)$"
    with pytest.raises(UserError, match=message):
        ingest_rows(cfg, tmp_path / "raise")
    cfg.on_error = "skip"
    metrics, rows = ingest_rows(cfg, tmp_path / "skip")
    assert (metrics["docs_kept"], metrics["records_skipped"], metrics["files_quarantined"]) == (29, 1, 0)
    assert [r["source"] for r in rows] == [f"{path}:{n}" for n in range(1, 31) if n != 13]
    quarantine = json.loads((tmp_path / "skip" / "quarantine.json").read_text())
    example = {"source": f"{path}:13", "reason": "invalid JSON line"}
    assert quarantine == {"files": [],
                          "skipped_records": [{"source": str(path), "records_skipped": 1, "examples": [example]}]}


def test_skipped_records_are_counted_per_file_with_a_few_examples(tmp_path):
    """Every kind of bad JSONL line (bad JSON, invalid UTF-8, not an object, no or a non-string text field)."""
    good = [json.dumps({"text": f"A good document, number {i}."}) for i in range(4)]
    bad = ["{not json", "[1, 2]", json.dumps({"title": "no text"}), json.dumps({"text": 5}), "\xff\xfe"]
    (tmp_path / "a.jsonl").write_bytes(("\n".join(good[:2] + bad + good[2:3])).encode("latin-1"))
    write_compressed(tmp_path / "b.jsonl.gz", "\n".join(["[]", good[3]]).encode(), "gzip")
    cfg = DataConfig(paths=[str(tmp_path / "*.jsonl*")], on_error="skip")
    metrics, rows = ingest_rows(cfg, tmp_path / "out")
    assert (metrics["docs_in"], metrics["records_skipped"]) == (4, 6)
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")
    assert [r["source"] for r in rows] == [f"{a}:1", f"{a}:2", f"{a}:8", f"{b}:2"]
    skipped = json.loads((tmp_path / "out" / "quarantine.json").read_text())["skipped_records"]
    assert [(s["source"], s["records_skipped"]) for s in skipped] == [(a, 5), (b, 1)]
    assert skipped[0]["examples"] == [{"source": f"{a}:3", "reason": "invalid JSON line"},
                                      {"source": f"{a}:4", "reason": "not a JSON object"},
                                      {"source": f"{a}:5", "reason": "no string field 'text' (data.text_field)"}]


def test_bad_csv_rows_are_an_error_or_skipped_alone(tmp_path):
    """A row with more or fewer fields than the header; the rows after it keep their numbers."""
    path = tmp_path / "t.csv"
    path.write_text('text,n\n"First row, with a comma",1\nsecond,2,extra\n"Third row\nover two lines",3\nlast\n')
    with pytest.raises(UserError, match=rf"^{path}:1: expected 2 fields, got 3 \(set data.on_error=skip"):
        sources.read_source(sources.Source("file", str(path), 0), "text")
    skipped: list = []
    docs = sources.read_source(sources.Source("file", str(path), 0), "text", skipped)
    assert docs == [(f"{path}:0", "First row, with a comma"), (f"{path}:2", "Third row\nover two lines")]
    assert skipped == [{"source": f"{path}:1", "reason": "expected 2 fields, got 3"},
                       {"source": f"{path}:3", "reason": "expected 2 fields, got 1"}]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text(TEXTS[0])
    path.chmod(0)
    with pytest.raises(UserError, match=rf"^{path}: cannot read \(Permission denied\)"):
        sources.read_source(sources.Source("file", str(path), 10), "text")


def test_unsupported_and_missing_sources_name_the_key(tmp_path):
    (tmp_path / "a.docx").write_bytes(b"x")
    with pytest.raises(UserError, match=r"^data.paths\[0\]: .*a.docx: unsupported file type '.docx'"):
        ingest.list_sources(DataConfig(paths=[str(tmp_path / "a.docx")]))
    with pytest.raises(UserError, match=r"^data.paths\[0\]: no file matches 'file://"):
        ingest.list_sources(DataConfig(paths=[f"file://{tmp_path}/missing.jsonl"]))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl.gz", ".txt.zst", ".arrow"])
def test_reader_survives_arbitrary_bytes(tmp_path, suffix):
    """Hostile bytes in the formats tests/faults/test_hostile_input.py does not cover: documents or
    one UserError naming the file, never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.faults.test_hostile_input import DATA

    counter = iter(range(10**6))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=DATA, compressed=st.booleans())
    def check(data, compressed):
        path = tmp_path / f"f{next(counter)}{suffix}"
        if compressed and suffix[-3:] in (".gz", "zst"):
            write_compressed(path, data, "gzip" if suffix.endswith(".gz") else "zstd")
        else:
            path.write_bytes(data)
        for skipped in (None, []):  # data.on_error raise, skip
            try:
                docs = sources.read_source(sources.Source("file", str(path), len(data)), "text", skipped)
            except UserError as error:
                assert str(error).startswith(str(path)) and "\n" not in str(error)
                continue
            assert all(isinstance(text, str) for _, text in docs)

    check()


def test_language_filter_in_ingest_is_counted(tmp_path):
    """Documents of other languages are dropped as 'language' and the accounting still adds up."""
    from tests.unit.test_quality import LANGUAGES

    (tmp_path / "mixed.jsonl").write_bytes(jsonl_bytes([f"{text} ({i})" for i in range(3) for text in LANGUAGES.values()]))
    cfg = DataConfig(paths=[str(tmp_path / "mixed.jsonl")])
    cfg.filters.languages = ["en"]
    out = tmp_path / "out"
    out.mkdir()
    metrics = ingest.run(cfg, {}, out, TaskContext())
    assert (metrics["docs_in"], metrics["docs_kept"], metrics["dropped_language"]) == (12, 3, 9)
    dropped = [json.loads(line) for line in (out / "dropped_examples.jsonl").read_text().splitlines()]
    assert {d["reason"] for d in dropped} == {"language"} and len(dropped) == cfg.examples_per_reason
