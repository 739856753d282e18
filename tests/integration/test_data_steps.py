"""ingest, tokenize and taskdata for real on tiny inputs (serial map: no Ray needed)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conf.schema import DataConfig, TaskConfig, TokenizerConfig
from tasks import ingest, taskdata, tokenize
from tasks.common import TaskContext, UserError


def run_ingest(cfg, out_dir, num_cpus=1):
    out_dir.mkdir(parents=True, exist_ok=True)
    return ingest.run(cfg, {}, out_dir, TaskContext("ingest", num_cpus=num_cpus))


def shard_rows(out_dir):
    return [row for shard in ingest.read_shards(out_dir) for row in pq.read_table(shard).to_pylist()]


def test_ingest_accounts_for_every_document(corpus_dir, tmp_path):
    cfg = DataConfig(paths=[f"{corpus_dir}/*.txt", f"{corpus_dir}/*.md", f"{corpus_dir}/*.jsonl"], min_chars=5)
    metrics = run_ingest(cfg, tmp_path / "out")
    assert metrics["docs_in"] == 5
    assert (metrics["docs_kept"], metrics["dropped_empty"], metrics["dropped_duplicate"], metrics["dropped_too_short"]) == (2, 1, 1, 1)
    assert metrics["docs_in"] == metrics["docs_kept"] + sum(v for k, v in metrics.items() if k.startswith("dropped_"))
    rows = shard_rows(tmp_path / "out")
    assert rows[0]["text"] == "The first document.\nIt has two lines.\n\nAnd a gap."
    assert {r["source"] for r in rows} == {str(corpus_dir / "a.txt"), f"{corpus_dir / 'c.jsonl'}:1"}


def test_ingest_output_does_not_depend_on_parallelism(tmp_path):
    cfg = DataConfig(builtin=["pydoc_topics"], docs_per_shard=7)
    run_ingest(cfg, tmp_path / "one", num_cpus=1)
    run_ingest(cfg, tmp_path / "many", num_cpus=8)
    assert shard_rows(tmp_path / "one") == shard_rows(tmp_path / "many")
    assert len(ingest.read_shards(tmp_path / "one")) > 1


def test_parquet_column_is_configurable_and_checked(corpus_dir, tmp_path):
    metrics = run_ingest(DataConfig(paths=[f"{corpus_dir}/*.parquet"], text_field="body"), tmp_path / "a")
    assert metrics["docs_kept"] == 2
    with pytest.raises(UserError, match=r"d.parquet: no column 'text' \(data.text_field\)"):
        run_ingest(DataConfig(paths=[f"{corpus_dir}/*.parquet"]), tmp_path / "b")


def test_missing_corpus_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"^data.paths\[0\]: no file matches"):
        ingest.list_sources(DataConfig(paths=[str(tmp_path / "nothing/*.txt")]))


def test_bad_utf8_stops_or_is_quarantined(corpus_dir, tmp_path):
    (corpus_dir / "bad.txt").write_bytes(b"ok \xff\xfe broken")
    cfg = DataConfig(paths=[f"{corpus_dir}/*.txt"])
    with pytest.raises(UserError, match=r"bad.txt: not valid utf-8 \(byte 3\)"):
        run_ingest(cfg, tmp_path / "a")
    metrics = run_ingest(DataConfig(paths=[f"{corpus_dir}/*.txt"], on_error="skip"), tmp_path / "b")
    assert metrics["files_quarantined"] == 1 and metrics["docs_kept"] == 1
    quarantined = json.loads((tmp_path / "b" / "quarantine.json").read_text())
    assert quarantined[0]["source"].endswith("bad.txt")


def test_corpus_without_usable_documents_is_an_error(corpus_dir, tmp_path):
    with pytest.raises(UserError, match="no usable documents"):
        run_ingest(DataConfig(paths=[f"{corpus_dir}/*.md"]), tmp_path / "out")


def test_tokenize_trains_encodes_packs_and_splits(tmp_path):
    ingest_dir = tmp_path / "ingest"
    run_ingest(DataConfig(builtin=["pydoc_topics"]), ingest_dir)
    out = tmp_path / "tok"
    out.mkdir()
    cfg = TokenizerConfig(vocab_size=600, seq_len=32, val_fraction=0.2, docs_per_task=10)
    metrics = tokenize.run(cfg, {"ingest": ingest_dir}, out, TaskContext("tokenize"))

    hf = tokenize.load_tokenizer(out / "tokenizer")
    assert len(hf) == 600 and hf.eos_token == tokenize.EOS and hf.pad_token == tokenize.PAD
    assert hf.decode(hf.encode("def f(x):\n    return x", add_special_tokens=False)) == "def f(x):\n    return x"
    train, val = tokenize.load_split(out, "train"), tokenize.load_split(out, "val")
    assert train.dtype == np.uint16 and train.shape[1] == 32 and metrics["train_tokens"] == train.size

    rows = shard_rows(ingest_dir)
    val_docs = [r for r in rows if tokenize.is_validation(r["doc_id"], 0.2)]
    expected_val = sum(len(hf.encode(r["text"], add_special_tokens=False)) + 1 for r in val_docs)
    assert val.size == expected_val // 32 * 32  # every val document, EOS-terminated, nothing else
    assert metrics["val_docs"] == len(val_docs) and metrics["train_docs"] == len(rows) - len(val_docs)
    assert (np.asarray(train) == hf.eos_token_id).sum() >= metrics["train_docs"] - 1


def test_taskdata_splits_user_records(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"item {i}", "label": "ab"[i % 2]}) for i in range(100)))
    out = tmp_path / "out"
    out.mkdir()
    cfg = TaskConfig(builtin=None, train_path=str(path))
    metrics = taskdata.run(cfg, {}, out, TaskContext("taskdata"))
    splits = {name: taskdata.load_split(out, name) for name in ("train", "val", "test")}
    assert sum(len(s) for s in splits.values()) == 100 == sum(metrics[f"{n}_records"] for n in splits)
    texts = [{r["text"] for r in s} for s in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert taskdata.load_labels(out) == ["a", "b"]
