"""ingest, tokenize and taskdata for real on tiny inputs (serial map: no Ray needed)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conf.schema import DataConfig, NearDedupConfig, TaskConfig, TokenizerConfig
from tasks import ingest, taskdata, tokenize
from tasks.common import TaskContext, UserError, serial_map


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
    assert quarantined["files"][0]["source"].endswith("bad.txt")


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
    assert len(hf) == 600 and hf.eos_token == cfg.eos_token and hf.pad_token == cfg.pad_token
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


def test_filters_and_dedup_account_for_every_document(tmp_path):
    from tests.unit.test_quality import FAILING, prose

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    long_doc = prose(300, 1)
    near_copy = long_doc.replace(long_doc.split()[150], "changed", 1)
    files = [[long_doc, prose(200, 2)], [FAILING["digit_ratio"], FAILING["repeated_lines"]],
             [prose(200, 2), prose(200, 3)], [FAILING["symbol_ratio"], ""], [near_copy, prose(200, 4)],
             [FAILING["mean_word_length"], FAILING["repeated_ngrams"]]]
    for i, texts in enumerate(files):
        (corpus / f"part{i}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cfg = DataConfig(paths=[f"{corpus}/*.jsonl"], near_dedup=NearDedupConfig(enabled=True))
    unit_counts = []
    ctx = TaskContext("ingest", parallel_map=lambda fn, items, on_result=None:
                      unit_counts.append(len(items)) or serial_map(fn, items, on_result))
    (tmp_path / "many").mkdir()
    metrics = ingest.run(dataclasses.replace(cfg, shard_bytes=500), {}, tmp_path / "many", ctx)  # files split
    one = run_ingest(cfg, tmp_path / "one")  # all in one unit

    dropped = {k.removeprefix("dropped_"): v for k, v in metrics.items() if k.startswith("dropped_") and v}
    assert dropped == {"empty": 1, "duplicate": 1, "near_duplicate": 1, "digit_ratio": 1, "repeated_lines": 1,
                       "symbol_ratio": 1, "mean_word_length": 1, "repeated_ngrams": 1}
    assert metrics["docs_in"] == 12 == metrics["docs_kept"] + sum(dropped.values())
    assert unit_counts[0] == metrics["units_total"] > len(files) and one["units_total"] == 1
    assert shard_rows(tmp_path / "one") == shard_rows(tmp_path / "many")
    examples = [json.loads(line) for line in (tmp_path / "many" / "dropped_examples.jsonl").read_text().splitlines()]
    assert {e["reason"] for e in examples} == set(dropped)
    near = next(e for e in examples if e["reason"] == "near_duplicate")
    assert near["source"] == f"{corpus}/part4.jsonl:1" and near["duplicate_of"] == f"{corpus}/part0.jsonl:1"


def test_source_weights_repeat_and_subsample(tmp_path):
    from tests.unit.test_quality import prose

    for name, seeds in (("a", range(0, 20)), ("b", range(100, 140))):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": prose(40, s)}) for s in seeds))
    cfg = DataConfig(paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], weights=[2.0, 0.5])
    metrics = run_ingest(cfg, tmp_path / "out")
    mixture = {g["group"]: g for g in json.loads((tmp_path / "out" / "mixture.json").read_text())}
    kept_b = mixture["paths.1"]["docs_written"]
    assert mixture["paths.0"]["docs_written"] == 40 and 10 <= kept_b <= 30
    assert metrics["dropped_subsampled"] == 40 - kept_b and metrics["docs_kept"] == 20 + kept_b
    assert metrics["docs_in"] == metrics["docs_kept"] + sum(v for k, v in metrics.items() if k.startswith("dropped_"))
    assert metrics["mix_share_paths.0"] + metrics["mix_share_paths.1"] == pytest.approx(1, abs=1e-5)
    rows = shard_rows(tmp_path / "out")
    assert len(rows) == metrics["docs_written"] == 40 + kept_b
    assert [r["doc_id"] for r in rows[-20:]] == [r["doc_id"] for r in rows[:20]]  # repeats after all first copies


def test_encode_batches_balance_characters_and_cover_every_document():
    lengths = [1, 1, 100, 1, 1, 50, 50] + [10] * 20
    bounds = tokenize.batch_bounds(lengths, num_batches=4, max_docs=5)
    assert [i for start, end in bounds for i in range(start, end)] == list(range(len(lengths)))
    assert max(end - start for start, end in bounds) <= 5 and bounds[0] == (0, 3)
