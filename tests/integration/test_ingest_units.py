"""The ingest step's work units for real: the output is the same for any unit size, finished units
survive a failed attempt and are reused, and damaged ones are computed again (serial map: no Ray;
tests/faults/test_ingest_kill.py kills a real pipeline run)."""
from __future__ import annotations

import dataclasses
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.schema import DataConfig, NearDedupConfig
from tasks import ingest, units
from tasks.common import Mirror, SharedFolder, TaskContext, serial_map
from tests.unit.test_quality import FAILING, prose


def write_corpus(corpus) -> DataConfig:
    """A large JSONL file (duplicates, near-duplicates, filtered and blank lines), one with bad lines
    (skipped), a Parquet file of many row groups, small text files, a compressed JSONL file and a
    truncated one (quarantined); two weighted groups."""
    corpus.mkdir()
    texts = [prose(60 + i % 50, i) for i in range(150)]
    texts[40], texts[90] = texts[10], texts[20].replace(texts[20].split()[30], "changed", 1)
    texts[60:64] = list(FAILING.values())[:4]
    lines = [json.dumps({"text": t}) for t in texts]
    lines[70] = ""
    (corpus / "big.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "broken.jsonl").write_text("\n".join(lines[:100] + ["{not json"] + lines[100:120] + ["[]"]))
    pq.write_table(pa.table({"text": [prose(40, 1000 + i) for i in range(120)] + texts[:5]}), corpus / "rows.parquet",
                   row_group_size=15)
    for i in range(6):
        (corpus / f"note{i}.txt").write_text(prose(30, 2000 + i) if i != 3 else texts[0])
    (corpus / "more.jsonl.gz").write_bytes(gzip.compress("\n".join(lines[:30]).encode()))
    (corpus / "cut.jsonl.gz").write_bytes(gzip.compress("\n".join(lines[:30]).encode())[:60])
    return DataConfig(paths=[f"{corpus}/*.jsonl", f"{corpus}/*[!l]"], weights=[1.0, 1.5], on_error="skip",
                      near_dedup=NearDedupConfig(enabled=True), docs_per_shard=40)


def run_ingest(cfg: DataConfig, out_dir, work_dir=None, parallel_map=serial_map, mirror: Mirror = SharedFolder()) -> dict:
    out_dir.mkdir(parents=True)
    return ingest.run(cfg, {}, out_dir, TaskContext("ingest", parallel_map=parallel_map, work_dir=work_dir,
                                                    mirror=mirror))


def step_files(out_dir) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


def result_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("units_")}


def test_output_is_byte_identical_for_any_unit_size(tmp_path):
    cfg = write_corpus(tmp_path / "corpus")
    outputs = {}
    for shard_bytes in (0, 4000, 900):
        metrics = run_ingest(dataclasses.replace(cfg, shard_bytes=shard_bytes), tmp_path / f"out{shard_bytes}")
        outputs[shard_bytes] = (metrics, step_files(tmp_path / f"out{shard_bytes}"))
    (metrics, files), (split_metrics, _) = outputs[0], outputs[900]
    assert metrics["units_total"] == 1 and split_metrics["units_total"] > 3 * metrics["sources"]
    assert metrics["dropped_duplicate"] >= 3 and metrics["dropped_near_duplicate"] >= 1
    assert metrics["files_quarantined"] == 1 and metrics["records_skipped"] == 2 and len(files) > 4
    for other_metrics, other_files in outputs.values():
        assert result_metrics(other_metrics) == result_metrics(metrics)
        assert other_files == files
    quarantined, broken = json.loads(files["quarantine.json"]), str(tmp_path / "corpus/broken.jsonl")
    assert [q["source"] for q in quarantined["files"]] == [str(tmp_path / "corpus/cut.jsonl.gz")]
    assert quarantined["skipped_records"] == [{"source": broken, "records_skipped": 2, "examples": [
        {"source": f"{broken}:101", "reason": "invalid JSON line"},
        {"source": f"{broken}:122", "reason": "not a JSON object"}]}]


class Crash(Exception):
    """What `crashing_map` raises in place of a killed driver."""


def crashing_map(after: int):
    """A parallel map that dies after `after` tasks, as a killed driver would."""
    def parallel_map(fn, items, on_result=None):
        for index, item in enumerate(items):
            if index == after:
                raise Crash
            on_result(index, fn(item))
    return parallel_map


def test_finished_units_are_reused_and_damaged_ones_computed_again(tmp_path, capsys):
    cfg = dataclasses.replace(write_corpus(tmp_path / "corpus"), shard_bytes=3000)
    expected = run_ingest(cfg, tmp_path / "uninterrupted")
    work = tmp_path / "work"
    with pytest.raises(Crash):
        run_ingest(cfg, tmp_path / "attempt1", work, crashing_map(after=5))
    assert units.progress(work) == (5, expected["units_total"])

    computed = []
    counting_map = lambda fn, items, on_result=None: computed.append(len(items)) or serial_map(fn, items, on_result)
    metrics = run_ingest(cfg, tmp_path / "attempt2", work, counting_map)
    assert (metrics["units_reused"], computed) == (5, [expected["units_total"] - 5])
    assert result_metrics(metrics) == result_metrics(expected)
    assert step_files(tmp_path / "attempt2") == step_files(tmp_path / "uninterrupted")
    assert "5 of" in capsys.readouterr().err

    unit_dirs = sorted(p.parent for p in (work / units.UNITS_DIR).glob(f"*/{units.RECORD}"))
    (unit_dirs[0] / units.DOCS).write_bytes((unit_dirs[0] / units.DOCS).read_bytes()[:-10])  # truncated
    (unit_dirs[1] / units.SIGNATURES).unlink()
    computed.clear()
    metrics = run_ingest(cfg, tmp_path / "attempt3", work, counting_map)
    assert (metrics["units_reused"], computed) == (expected["units_total"] - 2, [2])
    err = capsys.readouterr().err
    assert f"work unit {unit_dirs[0].name}: {units.DOCS} is truncated" in err and "computing it again" in err
    assert f"{units.SIGNATURES} is missing" in err
    assert step_files(tmp_path / "attempt3") == step_files(tmp_path / "uninterrupted")


def test_finished_units_of_another_node_are_reused_through_the_store(tmp_path):
    """paths.root is a URI: the node that ran the first attempt is gone; the next attempt, on a node
    with an empty directory, takes the finished units from the store."""
    from pipelines.store import NodeMirror

    cfg = dataclasses.replace(write_corpus(tmp_path / "corpus"), shard_bytes=3000)
    expected = run_ingest(cfg, tmp_path / "uninterrupted")
    (tmp_path / "store").mkdir()
    nodes = {name: tmp_path / name for name in ("node-a", "node-b")}
    mirrors = {name: NodeMirror((tmp_path / "store").as_uri(), str(root)) for name, root in nodes.items()}
    work = {name: root / "ingest" / ".partial-x" for name, root in nodes.items()}
    with pytest.raises(Crash):
        run_ingest(cfg, tmp_path / "attempt1", work["node-a"], crashing_map(after=5), mirrors["node-a"])
    assert len(list((tmp_path / "store" / "ingest" / ".partial-x" / units.UNITS_DIR).glob(f"*/{units.RECORD}"))) == 5

    computed = []
    counting_map = lambda fn, items, on_result=None: computed.append(len(items)) or serial_map(fn, items, on_result)
    metrics = run_ingest(cfg, tmp_path / "attempt2", work["node-b"], counting_map, mirrors["node-b"])
    assert (metrics["units_reused"], computed) == (5, [expected["units_total"] - 5])
    assert step_files(tmp_path / "attempt2") == step_files(tmp_path / "uninterrupted")
