"""Fingerprints, the plan and its reasons, and atomic publication of step directories."""
from __future__ import annotations

import dataclasses

import pytest

from pipelines import artifacts, dag
from tasks.common import UserError
from tests.conftest import compose_config


def fingerprints(cfg, root):
    return {p.step.name: p.fingerprint for p in dag.plan(cfg, root)}


def test_fingerprints_are_stable_and_ignore_placement(tiny_cfg, tmp_path):
    base = fingerprints(tiny_cfg, tmp_path)
    assert base == fingerprints(tiny_cfg, tmp_path)
    moved = dataclasses.replace(tiny_cfg, pretrain=dataclasses.replace(tiny_cfg.pretrain, num_workers=1, log_every=1))
    assert fingerprints(moved, tmp_path) == base


def test_finetune_option_changes_only_finetune_and_evaluate(tiny_cfg, tmp_path):
    base = fingerprints(tiny_cfg, tmp_path)
    lora = dataclasses.replace(tiny_cfg.finetune.lora, r=4)
    changed = fingerprints(dataclasses.replace(tiny_cfg, finetune=dataclasses.replace(tiny_cfg.finetune, lora=lora)), tmp_path)
    assert {name for name in base if base[name] != changed[name]} == {"finetune", "evaluate"}


def test_options_of_an_unused_method_do_not_rerun(tiny_cfg, tmp_path):
    prefix = dataclasses.replace(tiny_cfg.finetune.prefix, num_virtual_tokens=3)
    changed = dataclasses.replace(tiny_cfg, finetune=dataclasses.replace(tiny_cfg.finetune, prefix=prefix))
    assert fingerprints(changed, tmp_path) == fingerprints(tiny_cfg, tmp_path)


def test_model_change_reruns_pretrain_and_everything_downstream(tiny_cfg, tmp_path):
    base = fingerprints(tiny_cfg, tmp_path)
    changed = fingerprints(dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, num_layers=3)), tmp_path)
    assert {n for n in base if base[n] != changed[n]} == {"pretrain", "finetune", "evaluate"}


def test_plan_says_cached_and_why_it_runs(tiny_cfg, tmp_path):
    root = tmp_path / "root"
    first = {p.step.name: p for p in dag.plan(tiny_cfg, root)}
    assert all(p.status == "run" and p.reason == "no earlier run" for p in first.values())

    for name in ("ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune"):  # pretend they finished
        p = first[name]
        staging = artifacts.staging_dir(root, name, p.fingerprint)
        artifacts.publish(staging, p.out_dir, {"config": p.view, "upstream": p.upstream, "finished_at": 1.0})
    lora = dataclasses.replace(tiny_cfg.finetune.lora, r=2)
    second = {p.step.name: p for p in dag.plan(
        dataclasses.replace(tiny_cfg, finetune=dataclasses.replace(tiny_cfg.finetune, lora=lora)), root)}
    assert [n for n, p in second.items() if p.status == "cached"] == \
        ["ingest", "tokenize", "pretrain", "taskdata", "decontaminate"]
    assert second["finetune"].reason == "config changed (finetune.lora.r: 16 -> 2)"
    assert second["evaluate"].reason == "no earlier run"


def test_directory_without_manifest_is_not_a_result(tiny_cfg, tmp_path):
    ingest = dag.plan(tiny_cfg, tmp_path)[0]
    ingest.out_dir.mkdir(parents=True)
    (ingest.out_dir / "shards").mkdir()
    replanned = dag.plan(tiny_cfg, tmp_path)[0]
    assert replanned.status == "run" and replanned.reason == "an earlier attempt did not finish"


def test_publish_records_every_file_with_its_hash(tmp_path):
    staging = artifacts.staging_dir(tmp_path, "step", "abc")
    (staging / "sub").mkdir()
    (staging / "sub" / "data.bin").write_bytes(b"12345")
    manifest = artifacts.publish(staging, tmp_path / "step" / "abc", {"step": "step"})
    assert not staging.exists()
    assert manifest["files"]["sub/data.bin"]["bytes"] == 5
    assert artifacts.read_manifest(tmp_path / "step" / "abc")["files"] == manifest["files"]


def test_damaged_step_directory_is_detected_and_recomputed(tiny_cfg, tmp_path, fault_table):
    import json

    ingest = dag.plan(tiny_cfg, tmp_path)[0]
    staging = artifacts.staging_dir(tmp_path, "ingest", ingest.fingerprint)
    (staging / "part-0.parquet").write_bytes(b"0123456789")
    artifacts.publish(staging, ingest.out_dir, {"config": ingest.view, "metrics": {"docs_kept": 3}})
    assert dag.plan(tiny_cfg, tmp_path)[0].status == "cached"

    (ingest.out_dir / "part-0.parquet").write_bytes(b"0123456788")  # same size, different bytes
    replanned = dag.plan(tiny_cfg, tmp_path)[0]
    assert replanned.status == "run"
    assert replanned.reason == ("the cached result is damaged (part-0.parquet does not match its recorded "
                                "SHA-256); recomputing")
    (ingest.out_dir / "part-0.parquet").write_bytes(b"01234")
    assert "part-0.parquet is truncated (5 of 10 bytes)" in dag.plan(tiny_cfg, tmp_path)[0].reason
    (ingest.out_dir / "part-0.parquet").write_bytes(b"0123456789abcde")
    assert "part-0.parquet changed size (15 bytes, 10 recorded)" in dag.plan(tiny_cfg, tmp_path)[0].reason

    (ingest.out_dir / "part-0.parquet").write_bytes(b"0123456789")  # files intact, manifest edited
    manifest_path = ingest.out_dir / artifacts.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["metrics"]["docs_kept"] = 1000
    manifest_path.write_text(json.dumps(manifest))
    assert "_manifest.json was edited" in dag.plan(tiny_cfg, tmp_path)[0].reason
    fault_table("step directory damaged on disk", "same-size altered bytes; truncated file; grown file; edited manifest",
                "each detected by the manifest's hashes, reported in the plan, step recomputed", "the damaged step", "0")


def test_decontamination_is_a_report_unless_it_removes(tiny_cfg, tmp_path):
    """By default decontaminate is a leaf (ingest + taskdata -> report); with remove=true tokenize reads
    its verdict, so tokenize and everything downstream move with the task data; enabled=false drops it."""
    def graph(**options):
        cfg = dataclasses.replace(tiny_cfg, decontaminate=dataclasses.replace(tiny_cfg.decontaminate, **options))
        return {p.step.name: p for p in dag.plan(cfg, tmp_path)}

    report, removing, off = graph(), graph(remove=True), graph(enabled=False)
    assert list(report) == ["ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune", "evaluate"]
    assert set(report["decontaminate"].upstream) == {"ingest", "taskdata"} and set(report["tokenize"].upstream) == {"ingest"}
    assert list(removing) == ["ingest", "taskdata", "decontaminate", "tokenize", "pretrain", "finetune", "evaluate"]
    assert set(removing["tokenize"].upstream) == {"ingest", "decontaminate"}
    assert {n for n in report if report[n].fingerprint != removing[n].fingerprint} == \
        {"decontaminate", "tokenize", "pretrain", "finetune", "evaluate"}
    assert "decontaminate" not in off and {n: p.fingerprint for n, p in off.items()} == \
        {n: p.fingerprint for n, p in report.items() if n != "decontaminate"}


def test_no_pretraining_control_is_planned_before_each_evaluation(tiny_cfg, tmp_path):
    """eval.no_pretraining: one control step (full fine-tuning from random init, the finetune settings)
    that every evaluation reads; a LoRA-only option does not change it, the learning rate does."""
    on = dataclasses.replace(tiny_cfg, eval=dataclasses.replace(tiny_cfg.eval, no_pretraining=True))
    planned = {p.step.name: p for p in dag.plan(on, tmp_path)}
    assert list(planned)[-3:] == ["control", "finetune", "evaluate"]
    assert "control" in planned["evaluate"].upstream and planned["control"].view["finetune"]["init"] == "random"
    lora = dataclasses.replace(on.finetune.lora, r=2)
    same = fingerprints(dataclasses.replace(on, finetune=dataclasses.replace(on.finetune, lora=lora)), tmp_path)
    faster = fingerprints(dataclasses.replace(on, finetune=dataclasses.replace(on.finetune, lr=0.1)), tmp_path)
    assert same["control"] == planned["control"].fingerprint != faster["control"]
    generation = dataclasses.replace(on, task=dataclasses.replace(on.task, kind="generation"))
    assert "control" not in fingerprints(generation, tmp_path)


def test_replay_makes_finetune_read_the_pretraining_rows(tiny_cfg, tmp_path):
    on = dataclasses.replace(tiny_cfg, finetune=dataclasses.replace(tiny_cfg.finetune, replay_fraction=0.25))
    assert "tokenize" in {p.step.name: p for p in dag.plan(on, tmp_path)}["finetune"].upstream
    assert "tokenize" not in {p.step.name: p for p in dag.plan(tiny_cfg, tmp_path)}["finetune"].upstream


def test_a_task_file_edited_in_place_reruns_taskdata_and_says_so(tiny_cfg, tmp_path):
    """The task files enter the fingerprint by their bytes, not their path."""
    data = tmp_path / "task.jsonl"
    data.write_text("".join(f'{{"text": "row {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(40)))
    cfg = dataclasses.replace(tiny_cfg, task=dataclasses.replace(tiny_cfg.task, builtin=None, train_path=str(data)))
    root = tmp_path / "root"
    first = {p.step.name: p for p in dag.plan(cfg, root)}
    for name in ("taskdata", "finetune"):
        p = first[name]
        artifacts.publish(artifacts.staging_dir(root, name, p.fingerprint), p.out_dir,
                          {"config": p.view, "upstream": p.upstream, "finished_at": 1.0})
    assert {p.step.name: p.status for p in dag.plan(cfg, root)}["taskdata"] == "cached"
    data.write_text(data.read_text().replace('"label": "b"', '"label": "c"'))  # same path, new labels
    second = {p.step.name: p for p in dag.plan(cfg, root)}
    assert second["taskdata"].status == "run" and "file_digests.train_path: the file changed" in second["taskdata"].reason
    assert second["finetune"].fingerprint != first["finetune"].fingerprint


def test_a_touched_or_copied_corpus_keeps_its_fingerprint_and_an_edited_one_reruns_ingest(tmp_path, digest_cache,
                                                                                          monkeypatch):
    """A fresh clone or a copy without -p changes only modification times: ingest (and an hour of
    pretraining after it) stays cached. Same-size edits rerun it. Each file is read once per
    (size, mtime, inode): the digest cache remembers it."""
    import os

    from tasks import file_digests

    corpus = tmp_path / "book.txt"
    corpus.write_text("It was a dark and stormy night. " * 40)
    cfg = compose_config(["+experiment=tiny", "data=files", f"data.paths=[{tmp_path}/*.txt]", f"paths.root={tmp_path}"])
    reads = []
    real = file_digests.sha256_of
    monkeypatch.setattr(file_digests, "sha256_of", lambda path: reads.append(path) or real(path))
    before = fingerprints(cfg, tmp_path)
    assert fingerprints(cfg, tmp_path) == before and reads == [str(corpus)]  # the second plan read nothing
    os.utime(corpus, ns=(1, 1))  # touched
    assert fingerprints(cfg, tmp_path) == before and len(reads) == 2
    corpus.unlink()
    corpus.write_text("It was a dark and stormy night. " * 40)  # copied back: another inode and mtime
    assert fingerprints(cfg, tmp_path) == before
    corpus.write_text("It was a dark and stormy NIGHT. " * 40)  # same size, other bytes
    changed = {p.step.name: p for p in dag.plan(cfg, tmp_path)}
    assert changed["ingest"].fingerprint != before["ingest"] and changed["pretrain"].fingerprint != before["pretrain"]
    assert digest_cache.exists()


def test_each_step_names_the_data_sets_it_reads_with_their_digests(tiny_cfg, tmp_path):
    """What MLflow's Dataset column shows per step: upstream data products by fingerprint, the user's
    files by what the fingerprint holds of them, each in its role."""
    data = tmp_path / "task.jsonl"
    data.write_text("".join(f'{{"text": "row {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(40)))
    cfg = dataclasses.replace(tiny_cfg, task=dataclasses.replace(tiny_cfg.task, builtin=None, train_path=str(data)))
    planned = {p.step.name: p for p in dag.plan(cfg, tmp_path)}
    read = {name: {(d["name"], d["digest"], d["context"]) for d in dag.datasets_read(p, tmp_path)}
            for name, p in planned.items()}
    fp = {name: p.fingerprint for name, p in planned.items()}
    assert read["ingest"] == {("corpus", planned["ingest"].view["sources_digest"], "source")}
    assert read["tokenize"] == {("corpus shards", fp["ingest"], "preprocessing")}
    assert read["pretrain"] == {("token arrays", fp["tokenize"], "training")}
    assert read["taskdata"] == {("task train", planned["taskdata"].view["file_digests"]["train_path"], "source")}
    assert read["finetune"] == {("task splits", fp["taskdata"], "training")}
    assert read["evaluate"] == {("token arrays", fp["tokenize"], "evaluation"), ("task splits", fp["taskdata"], "evaluation")}
    (split,) = dag.datasets_read(planned["finetune"], tmp_path)
    assert split["source"] == str(tmp_path / "taskdata" / fp["taskdata"])


def test_an_augmentation_lexicon_counts_by_its_bytes(tiny_cfg, tmp_path):
    lexicon = tmp_path / "lexicon.json"
    lexicon.write_text('{"good": ["fine"]}')
    augment = dataclasses.replace(tiny_cfg.finetune.augment, copies=1, lexicon_path=str(lexicon))
    cfg = dataclasses.replace(tiny_cfg, finetune=dataclasses.replace(tiny_cfg.finetune, augment=augment))
    before = fingerprints(cfg, tmp_path)["finetune"]
    lexicon.write_text('{"good": ["great"]}')
    assert fingerprints(cfg, tmp_path)["finetune"] != before


def test_until_plans_a_step_and_only_what_it_reads(tiny_cfg, tmp_path):
    whole = fingerprints(tiny_cfg, tmp_path)
    assert fingerprints(dataclasses.replace(tiny_cfg, until="pretrain"), tmp_path) == {
        name: whole[name] for name in ("ingest", "tokenize", "pretrain")}
    # decontaminate only reports (unless decontaminate.remove): evaluate does not read it
    assert set(fingerprints(dataclasses.replace(tiny_cfg, until="evaluate"), tmp_path)) == set(whole) - {"decontaminate"}
    branched = compose_config(["+experiment=tiny_techniques", f"paths.root={tmp_path}", "until=finetune"])
    assert sorted(fingerprints(branched, tmp_path)) == sorted(
        ["ingest", "tokenize", "pretrain", "taskdata", "finetune.lora", "finetune.full"])
    with pytest.raises(UserError, match=r"until: 'pretrian' is not a step of this experiment; one of ingest, "):
        dag.plan(dataclasses.replace(tiny_cfg, until="pretrian"), tmp_path)


def reads_only_earlier_steps(steps) -> bool:
    seen: set[str] = set()
    for step in steps:
        if not set(step.deps) | set(step.members) <= seen:
            return False
        seen.add(step.name)
    return True


@pytest.mark.parametrize("overrides", [
    ["+experiment=tiny"], ["+experiment=tiny", "decontaminate.remove=true", "finetune.replay_fraction=0.2"],
    ["+experiment=tiny", "decontaminate.enabled=false", "eval.no_pretraining=false"],
    ["+experiment=tiny_compare", "eval.ensemble=[full,lora]", "decontaminate.remove=true"]])
def test_the_plan_is_a_topological_order_of_the_enabled_steps(overrides, tmp_path):
    """Each step after every step it reads; exactly the declared steps whose `enabled` holds."""
    cfg = compose_config([*overrides, f"paths.root={tmp_path}"])
    steps = dag.steps_for(cfg)
    assert reads_only_earlier_steps(steps)
    assert [s.name for s in steps] == [p.step.name for p in dag.plan(cfg, tmp_path)]
    assert {s.name for s in steps} == {s.name for s in dag.declared(cfg) if s.enabled(cfg)}
    assert all(isinstance(dep, str) for s in steps for dep in s.deps)  # every conditional input resolved


def test_decontaminate_remove_adds_an_edge_to_the_declared_tokenize_step(tiny_cfg):
    """decontaminate.remove is a conditional input declared on tokenize; the sort moves the task data
    and decontamination before it."""
    assert [dep.step for dep in dag.TOKENIZE.deps if isinstance(dep, dag.Read)] == ["decontaminate"]
    removing = dataclasses.replace(tiny_cfg, decontaminate=dataclasses.replace(tiny_cfg.decontaminate, remove=True))
    before, after = ({s.name: s for s in dag.steps_for(cfg)} for cfg in (tiny_cfg, removing))
    assert before["tokenize"].deps == ("ingest",) and after["tokenize"].deps == ("ingest", "decontaminate")
    assert {name: s.deps for name, s in before.items() if name != "tokenize"} == \
        {name: s.deps for name, s in after.items() if name != "tokenize"}
    assert list(after)[:4] == ["ingest", "taskdata", "decontaminate", "tokenize"]


def test_the_sort_keeps_declaration_order_among_ready_steps_and_refuses_a_circle():
    def step(name, *deps):
        return dag.Step(name, 1, fn=None, section=None, deps=deps)

    assert [s.name for s in dag.topological((step("a"), step("b", "c"), step("c", "a"), step("d")))] == ["a", "c", "b", "d"]
    with pytest.raises(ValueError, match="circle"):
        dag.topological((step("x", "y"), step("y", "x")))
    with pytest.raises(ValueError, match=r"reads \['z'\]"):
        dag.topological((step("x", "z"),))
