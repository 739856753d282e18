"""A user's own corpus, task files and experiment file, in a config folder outside the repository,
through the real command line (`python -m pipelines.run --config-dir ...`): one big text file as the
whole corpus, headerless TSV task files, a task file edited in place, and the settings that would
otherwise be silently ignored (built-in corpus or task still active, keys added with `+`, a method
switched without its defaults)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

TASK_TOPICS = ("exceptions", "formatstrings", "class")
"""pydoc topics whose sentences make the task (label: the topic); the others make the book."""
TEST_LINES: list = []
"""The records written to test.tsv."""


def sentences(text: str) -> list[str]:
    return [s.strip().replace("\n", " ").replace("\t", " ") + "." for s in re.split(r"\.\s", text)
            if 40 <= len(s.strip()) <= 200]


def write_own_data(folder):
    """A book (one .txt file of about 150 KB of Python's reference prose), a headerless TSV train and test
    file (sentence<TAB>topic), and an experiment file of one's own that starts from `tiny`."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    book = "\n".join(topics[k] for k in sorted(topics) if k not in TASK_TOPICS)[:150_000]
    (folder / "book.txt").write_text(book)
    rows = [(s, topic) for topic in TASK_TOPICS for s in sentences(topics[topic])[:28]]
    train, test = rows[::4] + rows[1::4] + rows[2::4], rows[3::4]
    TEST_LINES[:] = test
    for name, split in (("train", train), ("test", test)):
        (folder / f"{name}.tsv").write_text("".join(f"{text}\t{label}\n" for text, label in split))
    (folder / "three.tsv").write_text("".join(f"{text}\t{label}\n" for text, label in train[:3]))
    (folder / "unseen.tsv").write_text("".join(f"{text}\t{label}\n" for text, label in test[:5]) + "a new kind\tother\n")
    conf = folder / "my_conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(f"""# @package _global_
defaults:
  - tiny
  - override /data: files
  - override /task: jsonl
experiment_name: mine
data:
  paths: ["{folder}/book.txt"]
  max_bytes: 0
  filters:
    max_doc_chars: 1000000   # the whole book is one document
task:
  train_path: {folder}/train.tsv
  test_path: {folder}/test.tsv
  header: false              # sentence<TAB>label: columns by position, in the order text, label
""")
    (conf / "from_quickstart.yaml").write_text(f"""# @package _global_
defaults:
  - quickstart
experiment_name: from_quickstart
data:
  paths: ["{folder}/book.txt"]
""")
    (conf / "task_without_override.yaml").write_text(f"""# @package _global_
defaults:
  - tiny
experiment_name: task_without_override
task:
  train_path: {folder}/train.tsv
""")
    return folder / "my_conf"


def lmforge(conf_dir, root, *overrides, experiment="mine", expect=0):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "--config-dir", str(conf_dir), f"+experiment={experiment}",
         f"paths.root={root}", "ray.num_cpus=2", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def plan(proc) -> dict[str, tuple[str, str]]:
    """step -> (run|cached, reason) from the printed plan."""
    found = {}
    for line in proc.stdout.split("plan:", 1)[1].splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) < 3 or parts[1] not in ("run", "cached"):
            break
        found[parts[0]] = (parts[1], parts[3] if len(parts) > 3 else "")
    return found


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own_data")
    return write_own_data(folder), folder / "runs"


@pytest.fixture(scope="module")
def first_run(own):
    conf, root = own
    return lmforge(conf, root)


def test_one_book_and_headerless_task_files_run_end_to_end(first_run, own):
    out = first_run.stdout + first_run.stderr  # step logs come through Ray's worker output
    # the book is one document: validation rows are held out of the packed stream
    assert re.search(r"the 1 document\(s\) are too few for a validation split by whole documents: held out \d+ of "
                     r"\d+ packed rows", out)
    summary = json.loads(open(re.search(r"summary JSON:\s+(\S+)", first_run.stdout).group(1)).read())
    steps = {s["name"]: s for s in summary["steps"]}
    assert all(s["status"] == "ran" for s in steps.values())
    assert steps["tokenize"]["metrics"]["val_split_by_rows"] == 1 and steps["tokenize"]["metrics"]["val_tokens"] > 0
    # the headerless TSV gave 3 labels, the topics, and every line a record (none taken as a header)
    assert steps["taskdata"]["metrics"]["num_labels"] == 3
    assert steps["taskdata"]["metrics"]["test_records"] == len(TEST_LINES)
    assert "finetuned_accuracy" in steps["evaluate"]["metrics"]


def test_task_file_edited_in_place_reruns_what_reads_it(first_run, own):
    conf, root = own
    assert set(s for s, _ in plan(lmforge(conf, root, "dry_run=true")).values()) == {"cached"}
    test_file = root.parent / "test.tsv"
    test_file.write_text("".join(test_file.read_text().splitlines(keepends=True)[:12]))  # rows cut, same path
    steps = plan(lmforge(conf, root, "dry_run=true"))
    assert steps["taskdata"][0] == "run" and "test_path" in steps["taskdata"][1] and "changed" in steps["taskdata"][1]
    assert steps["finetune"][0] == "run" and steps["evaluate"][0] == "run"
    assert steps["ingest"][0] == steps["tokenize"][0] == steps["pretrain"][0] == "cached"


@pytest.mark.parametrize("experiment,overrides,message", [
    ("from_quickstart", [], "data.paths: .*override /data: files"),
    ("task_without_override", [], "task.train_path: .*override /task: jsonl"),
    ("mine", ["+task.label_field=label"], "task.label_field: not a setting lmforge knows, did you mean task.fields"),
    ("mine", ["+data.max_doc_chars=5"], "data.max_doc_chars: not a setting .*did you mean data.filters.max_doc_chars"),
    ("mine", ["finetune.method=full"], "finetune.method=full: its lr 0.003 comes from conf/finetune/lora.yaml .*write "
                                       "finetune=full"),
    ("mine", ["task.header=true"], "train.tsv:2: missing field 'text' .*the header row gave the columns .*task.header=false"),
    ("mine", ["task.train_path={folder}/three.tsv", "task.test_path=null"], r"task: the (train|val|test) split is empty"),
    ("mine", ["paths.root={folder}/book.txt/runs"], r"paths.root: '.*book.txt/runs' cannot be a folder \(it, or a part of its path, is a file\)"),
    ("mine", ["task.test_path={folder}/unseen.tsv"], r"task.test_path: label\(s\) 'other' occur in 1 val/test record"),
])
def test_settings_that_would_be_ignored_stop_at_start(own, tmp_path, experiment, overrides, message):
    conf, _ = own
    overrides = [o.format(folder=conf.parent) for o in overrides]
    proc = lmforge(conf, tmp_path / "runs", "dry_run=true", *overrides, experiment=experiment, expect=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match("error: (\\S*/)?" + message, last), last
    assert not (tmp_path / "runs").exists()  # a run that stops at its checks makes nothing, not even Hydra's folder


def test_one_big_file_dropped_as_too_long_names_the_settings(own, tmp_path):
    conf, _ = own
    proc = lmforge(conf, tmp_path / "runs", "data.filters.max_doc_chars=100000", expect=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.filters.max_doc_chars" in last and "data.text_chunk_chars" in last, last
