"""Work units of the ingest step (tasks/units.py): how sources are cut, and that the pieces of a
file read back as the whole file does."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import sources, units
from tasks.common import UserError
from tasks.sources import Part, Source


def file_source(path) -> Source:
    return Source("file", str(path), path.stat().st_size)


def test_units_group_small_files_split_large_ones_and_keep_the_rest_whole(tmp_path):
    names = {"a.txt": 300, "b.txt": 300, "c.txt": 300, "big.jsonl": 2500, "big.jsonl.gz": 2500, "big.csv": 2500}
    for name, size in names.items():
        (tmp_path / name).write_bytes(b"x" * size)
    found = sorted((file_source(tmp_path / name) for name in names), key=lambda s: s.key)
    plan = units.plan(found, shard_bytes=1000)
    parts = [part for unit in plan for part in unit.parts]
    assert [p.source.key for p in parts if p.whole] == [str(tmp_path / n) for n in
                                                        ("a.txt", "b.txt", "big.csv", "big.jsonl.gz", "c.txt")]
    jsonl = [(p.start, p.stop) for p in parts if p.source.key.endswith("big.jsonl")]
    assert jsonl == [(0, 1000), (1000, 2000), (2000, 2500)]
    assert all(unit.size <= 1000 or len(unit.parts) == 1 for unit in plan)
    assert [p.source.key.rsplit("/", 1)[1] for p in plan[0].parts] == ["a.txt", "b.txt"]  # grouped up to 1000
    assert units.plan(found, shard_bytes=1000) == plan and len({u.key for u in plan}) == len(plan)
    assert units.unit_bytes(found, 0) == units.AUTO_MIN_BYTES


def read_as_whole_file(part_list: list[Part], skipped: list | None = None) -> list[tuple[str, str]]:
    """What the merge sees of a file read in pieces (tasks.units.whole_files); with `skipped`
    (data.on_error=skip), the bad records of all pieces are added there, numbered in the file."""
    from tasks.mixing import Doc

    results = []
    for part in part_list:
        part_skipped = None if skipped is None else []
        docs, lines = sources.read_part(part, "text", part_skipped)
        results.append({"source": part.source.key, "docs": [Doc("", t, i, part.source.key) for i, t in docs],
                        "examples": {}, "lines": lines, "error": None, "skipped_examples": part_skipped or []})
    merged = units.whole_files(results)
    if skipped is not None:
        skipped += [e for r in merged for e in r["skipped_examples"]]
    return [(d.source, d.text) for r in merged for d in r["docs"]]


@pytest.mark.parametrize("uri", [False, True])
def test_jsonl_ranges_read_as_the_whole_file(tmp_path, uri):
    lines = [json.dumps({"text": f"document {i} " + "word " * (i % 7) * 9}) for i in range(40)]
    lines[5], lines[11] = "", "   "  # blank lines are counted, not read
    lines[20] = json.dumps({"text": "a long one " * 300})  # longer than several ranges
    data = ("\n".join(lines[:30]) + "\r\n" + "\n".join(lines[30:])).encode()  # one CRLF, no final newline
    path = tmp_path / "c.jsonl"
    path.write_bytes(data)
    key = f"file://{path}" if uri else str(path)
    source = Source("file", key, len(data))
    whole = sources.read_source(source, "text")
    assert len(whole) == 38
    for target in (1, 7, 64, 500, 4096, len(data)):
        assert read_as_whole_file(units.split(source, target)) == whole, target


def test_bad_line_in_a_later_range_names_the_files_own_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"text": f"line {i}"}) for i in range(30)] + ["{broken"]))
    source = file_source(path)
    last = units.split(source, 50)[-1]
    with pytest.raises(UserError, match=rf"^{path}:31: invalid JSON line \({sources.SKIP_HINT}\)$"):
        sources.read_part(last, "text")


def test_skipped_lines_of_jsonl_ranges_keep_the_files_own_numbers(tmp_path):
    """data.on_error=skip: the bad lines of every range are reported with the file's line numbers, and
    the good lines keep theirs, whatever the range size."""
    lines = [json.dumps({"text": f"line {i}"}) for i in range(40)]
    lines[3], lines[17], lines[35] = "{broken", "[1, 2]", json.dumps({"text": 7})
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source = file_source(path)
    whole_skipped: list = []
    whole = sources.read_source(source, "text", whole_skipped)
    assert [s for s, _ in whole] == [f"{path}:{n}" for n in range(1, 41) if n not in (4, 18, 36)]
    assert whole_skipped == [{"source": f"{path}:4", "reason": "invalid JSON line"},
                             {"source": f"{path}:18", "reason": "not a JSON object"},
                             {"source": f"{path}:36", "reason": "no string field 'text' (data.text_field)"}]
    for target in (30, 100, 333):
        skipped: list = []
        assert read_as_whole_file(units.split(source, target), skipped) == whole, target
        assert skipped == whole_skipped, target


def test_parquet_row_groups_read_as_the_whole_file(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * (i % 5 + 1) for i in range(100)]}), path, row_group_size=10)
    source = file_source(path)
    parts = units.split(source, source.size // 4)
    assert len(parts) > 2 and (parts[0].start, parts[-1].stop) == (0, 10)
    assert read_as_whole_file(parts) == sources.read_source(source, "text")
    with pytest.raises(UserError, match=rf"^{path}: no column 'body' \(data.text_field\)"):
        sources.read_part(parts[1], "body")


def test_failed_piece_quarantines_the_whole_file_once():
    ok = {"source": "f", "docs": ["doc"], "examples": {}, "lines": 3, "error": None, "docs_in": 1, "dropped": {}}
    results = [ok, {**ok, "error": "f:9: invalid JSON line"}, {**ok, "error": "f:20: invalid JSON line"},
               {**ok, "source": "g"}]
    merged = units.whole_files(results)
    assert [(r["source"], r["error"], r["docs"]) for r in merged] == [("f", "f:9: invalid JSON line", []),
                                                                      ("g", None, ["doc"])]


def test_jsonl_pieces_of_arbitrary_bytes_read_as_the_whole_file(tmp_path):
    """Hostile bytes cut at any size: the pieces give the whole file's documents, or its very error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.faults.test_hostile_input import DATA

    counter = iter(range(10**6))

    def outcome(read):
        try:
            return read()
        except UserError as error:
            assert "\n" not in str(error)
            return str(error)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=DATA, target=st.integers(1, 80))
    def check(data, target):
        path = tmp_path / f"f{next(counter)}.jsonl"
        path.write_bytes(data)
        source = Source("file", str(path), len(data))
        assert outcome(lambda: read_as_whole_file(units.split(source, target))) == \
            outcome(lambda: sources.read_source(source, "text"))
        skipped_in_pieces, skipped_whole = [], []  # data.on_error=skip: the same records kept and skipped
        assert outcome(lambda: read_as_whole_file(units.split(source, target), skipped_in_pieces)) == \
            outcome(lambda: sources.read_source(source, "text", skipped_whole))
        assert skipped_in_pieces == skipped_whole

    check()
