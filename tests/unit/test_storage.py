"""The storage modes behind one interface (pipelines/storage.py), without Ray: a data step's attempt
on a shared root and on nodes that share only an object store, the stop channel of a training step's
directory, and paths into the driver's working copy made a node's."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conf.schema import PathsConfig, placement
from pipelines import artifacts, storage, store
from tasks.common import SharedFolder


@dataclass
class Members:
    member_dirs: dict = placement(None)
    note: str = ""
    listed: dict = field(default_factory=dict)


def run_data_attempt(attempt: storage.Attempt, payload: str = "result") -> dict:
    """What the executor's Ray task does with an attempt: write into the staging directory, publish."""
    with attempt.data(Members(), print) as place:
        (place.staging / "out.txt").write_text(payload + "".join(sorted(str(p) for p in place.inputs.values())))
        place.work_dir.mkdir(parents=True, exist_ok=True)
        return attempt.publish(place, {"n": 1}, ["node"])


def base(step: str, fingerprint: str) -> dict:
    return {"step": step, "fingerprint": fingerprint, "started_at": 0.0}


def test_a_shared_root_publishes_in_place(tmp_path):
    shared = storage.open_storage(PathsConfig(root=str(tmp_path / "root")))
    assert isinstance(shared, storage.SharedRoot) and shared.step_store is None
    attempt = storage.SharedAttempt("ingest", "a" * 16, {}, base("ingest", "a" * 16), "t", shared.root)
    manifest = run_data_attempt(attempt)
    out = artifacts.step_dir(shared.root, "ingest", "a" * 16)
    assert artifacts.read_manifest(out) == manifest and not artifacts.damage(out, manifest)
    assert manifest["metrics"] == {"n": 1} and manifest["placement"] == {"node_ids": ["node"]}
    assert not list((shared.root / "ingest").glob(".*"))  # staging renamed, working directory gone


def test_nodes_that_share_only_the_store_fetch_inputs_and_publish_there(tmp_path, monkeypatch):
    monkeypatch.delenv("LMFORGE_CACHE", raising=False)
    uri = (tmp_path / "store").as_uri()
    (tmp_path / "store").mkdir()
    driver = storage.open_storage(PathsConfig(root=uri, cache=str(tmp_path / "driver")))
    assert isinstance(driver, storage.ObjectStoreRoot) and driver.step_store.uri == uri
    first = storage.NodeAttempt("ingest", "a" * 16, {}, base("ingest", "a" * 16), "t", uri, str(tmp_path / "node-a"),
                                str(driver.root))
    ingest = run_data_attempt(first)
    assert driver.step_store.manifest("ingest", "a" * 16) == ingest
    second = storage.NodeAttempt("tokenize", "b" * 16, {"ingest": "a" * 16}, base("tokenize", "b" * 16), "t", uri,
                                 str(tmp_path / "node-b"), str(driver.root))
    run_data_attempt(second)
    fetched = artifacts.step_dir(tmp_path / "node-b", "ingest", "a" * 16)
    assert artifacts.read_manifest(fetched) == ingest  # the input came to node b through the store
    assert driver.step_store.manifest("tokenize", "b" * 16)["inputs"] == {"ingest": str(fetched)}
    assert not (tmp_path / "store" / "tokenize" / f".partial-{'b' * 16}").exists()


def test_stop_files_carry_a_request_and_a_takeover(tmp_path):
    (tmp_path / storage.OWNER_FILE).write_text("mine")
    channel = storage.StopFiles(tmp_path, "mine")
    assert not channel.requested() and not channel.superseded()
    channel.request()
    assert channel.requested()
    (tmp_path / storage.OWNER_FILE).write_text("a later launch")
    assert channel.superseded()


def test_relocate_makes_planned_step_directories_this_nodes(tmp_path):
    driver = tmp_path / "driver"
    fetched = []

    def fetch(step, fingerprint):
        fetched.append((step, fingerprint))
        return tmp_path / "node" / step / fingerprint

    step_dir = str(driver / "evaluate" / ("c" * 16))
    section = Members({"lora": step_dir, "data": str(driver / "data" / "file.txt")}, note=step_dir, listed={"x": step_dir})
    moved = storage.relocate(section, str(driver), fetch)
    assert moved.member_dirs == {"lora": str(tmp_path / "node" / "evaluate" / ("c" * 16)),
                                 "data": str(driver / "data" / "file.txt")}  # not a step directory: as it was
    assert moved.note == step_dir and moved.listed == {"x": step_dir}  # only placement fields are the planner's
    assert fetched == [("evaluate", "c" * 16)]
    unchanged = Members({"data": "/elsewhere"})
    assert storage.relocate(unchanged, str(driver), fetch) is unchanged


def test_a_shared_folder_keeps_nothing_apart():
    folder = SharedFolder()
    assert folder.tends(0) and not folder.tends(1)
    assert folder.folders(Path("/")) == [] and not folder.has(Path("/etc/hostname"))


def test_an_unwritable_root_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(storage.UserError, match="^paths.root: .* is not writable here"):
        storage.check_root(PathsConfig(root=str(blocker / "below")))
    storage.check_root(PathsConfig(root="s3://bucket/prefix"))  # a URI is the store's to judge
    assert store.is_uri("s3://bucket/prefix")
