"""The check before any Ray work that the cluster can hold each training step: against what it has
now, or, with an autoscaler, what its node groups can grow to (no Ray started)."""
from __future__ import annotations

import dataclasses

import pytest

from pipelines import dag, executor
from tasks.common import UserError
from tests.conftest import compose_config


def planned(tmp_path, *overrides):
    return dag.plan(compose_config(["+experiment=tiny", f"paths.root={tmp_path}", *overrides]), tmp_path)


def test_a_step_larger_than_a_fixed_cluster_stops_the_run(tmp_path):
    steps = planned(tmp_path, "pretrain.use_gpu=true", "pretrain.num_workers=4")
    with pytest.raises(UserError, match=r"^pretrain.num_workers x cpus_per_worker needs 4 GPU, the Ray cluster has 1$"):
        executor.check_resources(steps, {"CPU": 64, "GPU": 1})


def test_an_autoscaler_that_can_grow_the_cluster_lets_it_start(tmp_path, capsys):
    steps = planned(tmp_path, "pretrain.use_gpu=true", "pretrain.num_workers=4")
    executor.check_resources(steps, {"CPU": 64, "GPU": 0}, {"CPU": 128, "GPU": 8})
    assert "pretrain needs 4 GPU, the Ray cluster has 0 now: its autoscaler adds nodes when the step starts (up to 8)" \
        in capsys.readouterr().out
    with pytest.raises(UserError, match=r"needs 4 GPU, the Ray cluster has 0 and its autoscaler can grow it to 2$"):
        executor.check_resources(steps, {"CPU": 64, "GPU": 0}, {"CPU": 128, "GPU": 2})


def test_cached_training_steps_need_nothing(tmp_path, capsys):
    steps = planned(tmp_path, "pretrain.use_gpu=true", "pretrain.num_workers=4")
    with pytest.raises(UserError, match=r"^pretrain.num_workers x cpus_per_worker needs "):  # to run, they do not fit
        executor.check_resources(steps, {"CPU": 1, "GPU": 0})
    cached = [dataclasses.replace(s, status="cached") for s in steps]
    executor.check_resources(cached, {"CPU": 1, "GPU": 0})
    executor.check_resources(cached, {"CPU": 1, "GPU": 0}, {"CPU": 128, "GPU": 8})  # nor is growth announced
    assert capsys.readouterr().out == ""


def test_the_autoscaler_ceiling_comes_from_the_config_it_publishes(monkeypatch):
    import ray._private.state

    state = ray._private.state.state
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 96, "GPU": 8})
    assert executor.autoscaler_ceiling() == {"CPU": 96, "GPU": 8}
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: None)  # no autoscaler
    assert executor.autoscaler_ceiling() is None
