"""The step store (pipelines/store.py, paths.store): upload with the manifest last, download checked
against the manifest, damaged or partial stored steps refused, and the plan using stored steps."""
from __future__ import annotations

import pytest

from pipelines import artifacts, dag, store
from tasks.common import UserError


def published(root, step="ingest", fingerprint="f" * 16) -> tuple:
    staging = artifacts.staging_dir(root, step, fingerprint)
    (staging / "shards").mkdir()
    (staging / "shards" / "part-00000.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 40)
    (staging / "report.json").write_text('{"docs": 3}')
    manifest = artifacts.publish(staging, artifacts.step_dir(root, step, fingerprint),
                                 {"step": step, "fingerprint": fingerprint, "config": {}, "metrics": {"docs": 3}})
    return artifacts.step_dir(root, step, fingerprint), manifest


def test_push_then_pull_elsewhere_gives_the_same_step(tmp_path):
    step_dir, manifest = published(tmp_path / "a")
    stored = store.open_store((tmp_path / "store").as_uri())
    assert stored.push(step_dir, manifest) is True
    assert stored.push(step_dir, manifest) is False  # already there
    assert stored.manifest("ingest", "f" * 16) == manifest
    pulled = stored.pull("ingest", "f" * 16, tmp_path / "b")
    copy = artifacts.step_dir(tmp_path / "b", "ingest", "f" * 16)
    assert pulled == manifest and artifacts.read_manifest(copy) == manifest and not artifacts.damage(copy, manifest)
    assert (copy / "shards" / "part-00000.parquet").read_bytes() == (step_dir / "shards" / "part-00000.parquet").read_bytes()
    assert not list((tmp_path / "b" / "ingest").glob(".staging-*"))


def test_damaged_or_unfinished_stored_steps_are_not_results(tmp_path):
    step_dir, manifest = published(tmp_path / "a")
    stored = store.open_store((tmp_path / "store").as_uri())
    stored.push(step_dir, manifest)
    remote = tmp_path / "store" / "ingest" / ("f" * 16)
    (remote / "report.json").write_text('{"docs": 4}')  # same size, other bytes
    with pytest.raises(UserError, match=r"^paths.store: the stored ingest f+ is damaged \(report.json does not match"):
        stored.pull("ingest", "f" * 16, tmp_path / "b")
    assert not (tmp_path / "b" / "ingest" / ("f" * 16)).exists() and not list((tmp_path / "b" / "ingest").glob(".*"))
    (remote / artifacts.MANIFEST).unlink()  # an upload cut short: files without their manifest
    assert stored.manifest("ingest", "f" * 16) is None


@pytest.mark.parametrize("uri,message", [("relative/dir", "is not a URI"), ("nosuch://bucket/x", "cannot use")])
def test_unusable_store_names_the_key(uri, message):
    with pytest.raises(UserError, match=f"^paths.store: .*{message}"):
        store.open_store(uri)
    assert store.open_store("") is None


def test_plan_takes_steps_from_the_store(tiny_cfg, tmp_path):
    here = {p.step.name: p for p in dag.plan(tiny_cfg, tmp_path / "a")}
    ingest = here["ingest"]
    step_dir, manifest = published(tmp_path / "a", "ingest", ingest.fingerprint)
    stored = store.open_store((tmp_path / "store").as_uri())
    stored.push(step_dir, manifest)
    elsewhere = {p.step.name: p for p in dag.plan(tiny_cfg, tmp_path / "b", store=stored)}
    assert elsewhere["ingest"].status == "cached" and elsewhere["ingest"].in_store
    assert "in the step store" in elsewhere["ingest"].reason
    assert elsewhere["tokenize"].status == "run" and not elsewhere["tokenize"].in_store
    assert not dag.plan(tiny_cfg, tmp_path / "a", store=stored)[0].in_store  # a local copy comes first


def test_fetch_steps_downloads_once_per_node_and_follows_the_stored_version(tmp_path):
    step_dir, manifest = published(tmp_path / "a")
    stored = store.open_store((tmp_path / "store").as_uri())
    stored.push(step_dir, manifest)
    said = []
    node = tmp_path / "node"
    found = store.fetch_steps(stored, node, {"ingest": "f" * 16}, said.append)
    assert found == {"ingest": artifacts.step_dir(node, "ingest", "f" * 16)}
    assert artifacts.read_manifest(found["ingest"]) == manifest and len(said) == 1
    store.fetch_steps(stored, node, {"ingest": "f" * 16}, said.append)
    assert len(said) == 1  # the node holds the stored version: nothing downloaded
    assert not list((node / "ingest").glob(".fetch-*"))  # the node's fetch lock is released
    with pytest.raises(UserError, match=r"^paths.root: .*/ingest/0+ has no complete step"):
        store.fetch_steps(stored, node, {"ingest": "0" * 16})


def test_node_mirror_keeps_a_nodes_files_in_the_store(tmp_path):
    """What a training step's checkpoints go through where nodes share no directory."""
    uri, node, other = (tmp_path / "store").as_uri(), tmp_path / "node", tmp_path / "other"
    (tmp_path / "store").mkdir()
    work = node / "pretrain" / ".partial-x"
    (work / "checkpoints" / "step00000002").mkdir(parents=True)
    (work / "checkpoints" / "step00000002" / "rank0.pt").write_bytes(b"0" * 100)
    (work / "train_log.jsonl").write_text('{"step": 1}\n')
    (work / ".owner").write_text("token")  # a dot-file stays on its node
    mirror = store.NodeMirror(uri, str(node))
    mirror.upload(work, exclude=("checkpoints",))
    mirror.upload(work / "checkpoints" / "step00000002", replace=False)
    remote = tmp_path / "store" / "pretrain" / ".partial-x"
    assert sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) == [
        "checkpoints/step00000002/rank0.pt", "train_log.jsonl"]
    assert mirror.folders(work / "checkpoints") == ["step00000002"]
    assert mirror.has(work / "checkpoints" / "step00000002" / "rank0.pt")

    (work / "train_log.jsonl").unlink()
    (work / "history.json").write_text("[]")
    mirror.upload(work, exclude=("checkpoints",))  # replace: the store follows the node
    assert not (remote / "train_log.jsonl").exists() and (remote / "history.json").is_file()
    assert (remote / "checkpoints" / "step00000002" / "rank0.pt").is_file()  # excluded, so kept

    elsewhere = store.NodeMirror(uri, str(other))
    there = other / "pretrain" / ".partial-x"
    elsewhere.download(there / "checkpoints" / "step00000002", replace=False)
    assert (there / "checkpoints" / "step00000002" / "rank0.pt").read_bytes() == b"0" * 100
    elsewhere.remove(there / "checkpoints" / "step00000002")
    assert elsewhere.folders(there / "checkpoints") == []
