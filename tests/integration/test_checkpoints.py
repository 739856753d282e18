"""The training loop's checkpoints and guards for real (DeepSpeed on CPU, fp32, gloo): a stop
request (what SIGTERM sends) checkpoints and resumes exactly at every ZeRO stage; a damaged
newest checkpoint falls back to the previous one; a planted pickle is refused; a checkpoint
written by two workers resumes on one; non-finite steps are skipped or stop the run."""
from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys

import pytest
import torch

from tasks import checkpoints, training
from tasks.common import Superseded, file_digest
from tests.conftest import REPO
from tests.integration.checkpoint_worker import BASE, run
from tests.integration.test_resume import free_port


def history(out_dir) -> list[tuple]:
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def fresh_dir(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    return path


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stop_request_checkpoints_and_resumes_exactly(single_rank, tmp_path, capsys, stage):
    cfg = dataclasses.replace(BASE, zero_stage=stage)
    reference = fresh_dir(tmp_path, "reference")
    run(reference, cfg)

    stopped = fresh_dir(tmp_path, "stopped")
    metrics, _ = run(stopped, cfg, stop_at=3)
    assert metrics == {"stopped_at_step": 3}
    assert (stopped / "checkpoints" / "latest").read_text() == "step00000003"
    assert checkpoints.problem(stopped / "checkpoints" / "step00000003") is None

    run(stopped, cfg)
    assert "resumed from the checkpoint at step 3/8" in capsys.readouterr().err
    assert history(stopped) == history(reference)  # exact, the loss window cut by the stop included


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(single_rank, tmp_path, capsys, fault_table):
    reference = fresh_dir(tmp_path, "reference")
    run(reference, BASE)
    damaged = fresh_dir(tmp_path, "damaged")
    run(damaged, BASE, stop_at=5)  # checkpoints at steps 4 and 5
    model_file = damaged / "checkpoints" / "step00000005" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])

    run(damaged, BASE)
    out = capsys.readouterr().err
    assert "checkpoint step00000005 is not usable: mp_rank_00_model_states.pt is truncated" in out
    assert "resumed from the checkpoint at step 4/8" in out
    assert history(damaged) == history(reference)
    fault_table("newest checkpoint damaged", "model states truncated to 1,000 bytes",
                "reported; resumed from the previous checkpoint; same losses", "1 training step", "0")


class Payload:
    """Unpickling this runs a command: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_planted_pickle_in_a_checkpoint_is_refused(single_rank, tmp_path, fault_table):
    out_dir = fresh_dir(tmp_path, "planted")
    run(out_dir, BASE, stop_at=2)
    tag_dir = out_dir / "checkpoints" / "step00000002"
    marker = tmp_path / "payload-ran"
    planted = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, planted, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    record = json.loads((tag_dir / checkpoints.COMPLETE).read_text())  # the attacker fixes the record too
    record["files"][planted.name] = {"bytes": planted.stat().st_size, "sha256": file_digest(planted)}
    (tag_dir / checkpoints.COMPLETE).write_text(json.dumps(record))

    with pytest.raises(checkpoints.UnsafeCheckpointError, match="mp_rank_00_model_states.pt: refused to unpickle"):
        run(out_dir, BASE)
    assert not marker.exists()
    fault_table("malicious pickle planted in a checkpoint (record fixed too)", "a __reduce__ payload",
                "UnsafeCheckpointError naming the file; the payload never ran", "-", "0")


def test_checkpoint_of_two_workers_resumes_on_one(single_rank, tmp_path, capsys):
    reference = fresh_dir(tmp_path, "reference")
    run(reference, BASE)  # one worker, uninterrupted
    out_dir = fresh_dir(tmp_path, "resized")
    port = free_port()
    workers = [subprocess.Popen([sys.executable, "-m", "tests.integration.checkpoint_worker", str(out_dir), str(rank),
                                 "2", port, str(BASE.zero_stage), "3"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    for worker in workers:
        output = worker.communicate(timeout=300)[0]
        assert worker.returncode == 0, output[-3000:]
    assert json.loads((out_dir / "checkpoints" / "step00000003" / checkpoints.COMPLETE).read_text())["world_size"] == 2

    run(out_dir, BASE)
    assert "written by 2 worker(s), resuming on 1" in capsys.readouterr().err
    resumed, expected = history(out_dir), history(reference)
    assert [r[0] for r in resumed] == [r[0] for r in expected]
    for got, want in zip(resumed, expected):  # the same training, up to the order of float sums
        assert got[1] == pytest.approx(want[1], rel=1e-5)


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_step_is_skipped(single_rank, tmp_path, capsys, stage):
    cfg = dataclasses.replace(BASE, zero_stage=stage, on_nonfinite="skip", max_steps=4, checkpoint_every=0)
    weights = {}

    def snapshot(step, engine):
        weights[step] = [p.detach().clone() for p in engine.module.parameters()]

    metrics, engine = run(fresh_dir(tmp_path, "skip"), cfg, nan_steps={2}, on_step=snapshot)
    assert metrics["skipped_steps"] == 1
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row)" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))  # the NaN step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # ordinary steps do
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_too_many_non_finite_steps_in_a_row_stop_the_run(single_rank, tmp_path):
    cfg = dataclasses.replace(BASE, zero_stage=2, on_nonfinite="skip", max_skipped_steps=3)
    with pytest.raises(training.NonFiniteError, match="3 steps in a row"):
        run(fresh_dir(tmp_path, "diverged"), cfg, nan_steps=set(range(1, 8)))


@pytest.mark.parametrize("switch,stage,steps,tolerance", [
    ("offload_optimizer", 2, 4, 1e-5),
    pytest.param("compile", 1, 3, 1e-4, marks=pytest.mark.slow),  # inductor may reorder float sums; compiling takes ~50 s
])
def test_placement_switch_gives_the_same_losses(single_rank, tmp_path, switch, stage, steps, tolerance):
    plain, switched = fresh_dir(tmp_path, "plain"), fresh_dir(tmp_path, switch)
    cfg = dataclasses.replace(BASE, zero_stage=stage, max_steps=steps, checkpoint_every=0)
    run(plain, cfg)
    run(switched, dataclasses.replace(cfg, **{switch: True}))
    assert [r[1] for r in history(switched)] == pytest.approx([r[1] for r in history(plain)], rel=tolerance)


def test_an_attempt_whose_directory_was_taken_over_stops_without_writing(single_rank, tmp_path):
    """What the workers of a killed driver see when a new launch takes the step over (the stop
    channel of a training step's directory, pipelines/storage.py)."""
    from pipelines.storage import OWNER_FILE, StopFiles

    out_dir = fresh_dir(tmp_path, "superseded")
    (out_dir / OWNER_FILE).write_text("killed launch")

    def take_over(step, _engine):
        if step == 3:
            (out_dir / OWNER_FILE).write_text("new launch")

    with pytest.raises(Superseded, match="another launch took over"):
        run(out_dir, dataclasses.replace(BASE, checkpoint_every=2), on_step=take_over, stop=StopFiles(out_dir))
    assert sorted(p.name for p in (out_dir / "checkpoints").glob("step*")) == ["step00000002"]  # none after step 3


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_nodes_that_share_no_directory_resume_through_the_store(single_rank, tmp_path, stage):
    """Two ranks as two nodes, each with its own directory, and a file:// store between them (what
    an object-store paths.root gives a multi-node training step). Stopped at step 3, then resumed
    with rank 0 on a fresh node and rank 1 where rank 0 was: the losses are those of an
    uninterrupted run."""
    store = tmp_path / "store"
    store.mkdir()

    def launch(out_dirs: list, stop_at: int, *node_roots):
        port = free_port()
        workers = [subprocess.Popen(
            [sys.executable, "-m", "tests.integration.checkpoint_worker", str(out_dirs[rank]), str(rank), "2", port,
             str(stage), str(stop_at), *([f"file://{store}", str(node_roots[rank])] if node_roots else [])],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
        outputs = [worker.communicate(timeout=300)[0] for worker in workers]
        for worker, output in zip(workers, outputs):
            assert worker.returncode == 0, output[-3000:]
        return outputs[0]

    reference = fresh_dir(tmp_path, "reference")
    launch([reference, reference], 0)  # one shared directory, uninterrupted
    nodes = {name: tmp_path / f"node-{name}" for name in ("a", "b", "c")}
    work = {name: root / "pretrain" / ".partial-x" for name, root in nodes.items()}

    launch([work["a"], work["b"]], 3, nodes["a"], nodes["b"])
    stored = store / "pretrain" / ".partial-x" / "checkpoints"
    assert sorted(p.name for p in stored.glob("step*")) == ["step00000002", "step00000003"]
    record = json.loads((stored / "step00000003" / checkpoints.COMPLETE).read_text())
    on_a = set(p.name for p in (work["a"] / "checkpoints" / "step00000003").iterdir())
    on_b = set(p.name for p in (work["b"] / "checkpoints" / "step00000003").iterdir())
    assert on_a - on_b and on_b - on_a  # each node holds only its own ranks' shards ...
    assert set(record["files"]) == (on_a | on_b) - {checkpoints.COMPLETE}  # ... the record lists both
    assert (store / "pretrain" / ".partial-x" / "train_log.jsonl").is_file()

    assert "resumed from the checkpoint at step 3/8" in launch([work["c"], work["a"]], 0, nodes["c"], nodes["a"])
    resumed, expected = history(work["c"]), history(reference)
    assert [r[0] for r in resumed] == [r[0] for r in expected]
    assert [r[1] for r in resumed] == pytest.approx([r[1] for r in expected], rel=1e-5)
    assert [r[2] for r in resumed if r[2]] == pytest.approx([r[2] for r in expected if r[2]], rel=1e-5)
    assert len([r for r in resumed if r[2]]) == 2
