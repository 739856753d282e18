"""Decontamination report (tasks/decontaminate.py): planted overlaps are found, nothing else."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.schema import DecontaminateConfig
from tasks import decontaminate, tokenize
from tasks.common import TaskContext, UserError, write_jsonl
from tests.unit.test_quality import prose


def test_planted_overlap_is_reported_per_set():
    corpus = [(f"doc{i}", prose(300, i)) for i in range(20)]
    leaked = " ".join(corpus[7][1].split()[40:70])  # 30 words copied from doc7
    sets = {"test": ["Question: " + leaked.upper() + "!", prose(50, 500), "too short"],
            "train": [prose(50, 600), prose(50, 601)]}
    result = decontaminate.report(corpus, sets, n=13)
    assert result["test"] == {"examples": 3, "checked": 2, "contaminated": 1, "share": 0.5,
                              "corpus_docs": ["doc7"], "shown": [sets["test"][0]]}
    assert result["train"]["contaminated"] == 0 and result["train"]["corpus_docs"] == []


def step_inputs(tmp_path, corpus: list[tuple[str, str]], splits: dict[str, list[dict]]) -> dict:
    """An ingest directory (two Parquet shards) and a taskdata directory, as the steps leave them."""
    shards = tmp_path / "ingest" / "shards"
    shards.mkdir(parents=True)
    for index, part in enumerate([corpus[: len(corpus) // 2], corpus[len(corpus) // 2 :]]):
        pq.write_table(pa.table({"doc_id": [d for d, _ in part], "text": [t for _, t in part],
                                 "source": ["s"] * len(part)}), shards / f"part-{index:05d}.parquet")
    (tmp_path / "taskdata").mkdir()
    for name, records in splits.items():
        write_jsonl(tmp_path / "taskdata" / f"{name}.jsonl", records)
    return {"ingest": tmp_path / "ingest", "taskdata": tmp_path / "taskdata"}


def test_step_reports_per_split_and_tokenize_leaves_out_what_it_found(tmp_path):
    corpus = [(f"doc{i}", prose(200, i)) for i in range(10)]
    leaked = " ".join(corpus[8][1].split()[10:40])
    chat = {"messages": [{"role": "user", "content": "Summarise: " + " ".join(corpus[2][1].split()[:20])},
                         {"role": "assistant", "content": "ok"}]}
    splits = {"train": [{"text": prose(40, 100), "label": "a"}, chat],
              "val": [{"text": prose(40, 101), "label": "b"}],
              "test": [{"text": leaked, "label": "a"}, {"text": prose(40, 102), "label": "b"}]}
    inputs = step_inputs(tmp_path, corpus, splits)
    out = tmp_path / "out"
    out.mkdir()
    metrics = decontaminate.run(DecontaminateConfig(), inputs, out, TaskContext("decontaminate"))
    assert metrics == {"corpus_docs_contaminated": 2, "train_checked": 2, "train_contaminated": 1,
                       "train_contaminated_share": 0.5, "val_checked": 1, "val_contaminated": 0,
                       "val_contaminated_share": 0.0, "test_checked": 2, "test_contaminated": 1,
                       "test_contaminated_share": 0.5}
    report = json.loads((out / "report.json").read_text())
    assert report["sets"]["test"]["corpus_docs"] == ["doc8"] and report["sets"]["train"]["corpus_docs"] == ["doc2"]
    assert json.loads((out / "contaminated_docs.json").read_text()) == ["doc2", "doc8"]

    doc_ids, texts, removed = tokenize.read_corpus({**inputs, "decontaminate": out}, TaskContext("tokenize"))
    assert removed == 2 and doc_ids == [d for d, _ in corpus if d not in ("doc2", "doc8")]
    assert tokenize.read_corpus(inputs, TaskContext("tokenize"))[2] == 0


def test_unknown_split_names_the_key(tmp_path):
    inputs = step_inputs(tmp_path, [("doc0", prose(50, 0))], {"train": [{"text": "x", "label": "a"}]})
    with pytest.raises(UserError, match=r"^decontaminate.sets: the task data has no split 'val'"):
        decontaminate.run(DecontaminateConfig(sets=["train", "val"]), inputs, tmp_path, TaskContext())
