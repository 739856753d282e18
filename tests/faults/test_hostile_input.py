"""Hostile input for the readers: arbitrary bytes and arbitrary JSON as corpus files and as
fine-tuning data in every supported format. Each read returns records or raises a UserError
that names the file; never another exception, never a hang."""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conf.schema import TaskConfig
from tasks import sources, taskdata
from tasks.common import UserError

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
FIELD_NAMES = st.sampled_from(["text", "label", "prompt", "completion", "messages", "role", "content", "x"])
# Raw bytes, and text that decodes, so that the parsers behind the decoder are reached too.
DATA = st.binary(max_size=400) | st.text(alphabet=st.characters(codec="utf-8"), max_size=400).map(str.encode) | \
    st.lists(st.sampled_from(["text", "label", ",", "\t", "\n", '"', "{", "}", ":", "a", "1"]), max_size=60).map(
        lambda parts: "".join(parts).encode())
RECORDS = st.dictionaries(FIELD_NAMES, JSON_VALUES | st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "robot"]), "content": JSON_VALUES}), max_size=3), max_size=4)


@contextmanager
def written(suffix: str, data: bytes) -> Iterator[Path]:
    """The data as a file in a directory of its own, removed after the example (hypothesis runs
    hundreds; a function-scoped tmp_path would be shared between them)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"data{suffix}"
        path.write_bytes(data)
        yield path


def read_task(path: Path, kind: str):
    try:
        records = taskdata.load_records(str(path), TaskConfig(kind=kind), "task.train_path")
    except UserError as error:
        assert str(path.name) in str(error) or "task.train_path" in str(error)
        return None
    assert records and all(set(r) == set(taskdata.FIELDS[kind]) for r in records)
    return records


def read_corpus(path: Path, size: int) -> None:
    try:
        docs = sources.read_source(sources.Source("file", str(path), size), "text")
    except UserError as error:
        assert str(path) in str(error)
        return
    assert all(isinstance(text, str) for _, text in docs)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
@SETTINGS
@given(data=DATA, kind=st.sampled_from(sorted(taskdata.FIELDS)))
def test_task_reader_survives_arbitrary_bytes(suffix, data, kind):
    with written(suffix, data) as path:
        read_task(path, kind)


@SETTINGS
@given(records=st.lists(RECORDS | JSON_VALUES, min_size=1, max_size=5), kind=st.sampled_from(sorted(taskdata.FIELDS)))
def test_task_reader_survives_arbitrary_json_records(records, kind):
    text = "\n".join(json.dumps(r) for r in records)
    with written(".jsonl", text.encode()) as path:
        read_task(path, kind)


@pytest.mark.parametrize("suffix", [".txt", ".py", ".jsonl", ".parquet"])
@SETTINGS
@given(data=DATA)
def test_corpus_reader_survives_arbitrary_bytes(suffix, data):
    with written(suffix, data) as path:
        read_corpus(path, len(data))


@SETTINGS
@given(records=st.lists(RECORDS | JSON_VALUES, min_size=1, max_size=5))
def test_corpus_reader_survives_arbitrary_json_records(records):
    with written(".jsonl", "\n".join(json.dumps(r) for r in records).encode()) as path:
        read_corpus(path, 0)
