"""`precision: auto`: bf16 or fp32 on CPU by measurement, remembered per machine."""
from __future__ import annotations

import pytest

from tasks import precision


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "precision.json"
    monkeypatch.setenv("LMFORGE_PRECISION_CACHE", str(path))
    return path


def timings(monkeypatch, fp32: float, bf16: float) -> list:
    calls = []

    def seconds(shapes, bf16_on, repeats=3):
        calls.append(bf16_on)
        return bf16 if bf16_on else fp32

    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    monkeypatch.setattr(precision, "seconds", seconds)
    return calls


@pytest.mark.parametrize("fp32, bf16, chosen", [(1.0, 0.5, "bf16"), (1.0, 0.95, "fp32"), (1.0, 2.0, "fp32")])
def test_bf16_is_taken_only_where_it_is_clearly_faster(cache, monkeypatch, fp32, bf16, chosen):
    timings(monkeypatch, fp32, bf16)
    choice = precision.choose(64, 128, 512, 256, 2, use_gpu=False)
    assert choice.precision == chosen
    assert f"{fp32 / bf16:.2f}x" in choice.reason


def test_a_cpu_without_native_bf16_takes_fp32_without_timing(cache, monkeypatch):
    calls = timings(monkeypatch, 1.0, 0.1)
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    choice = precision.choose(64, 128, 512, 256, 2, use_gpu=False)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and calls == []


def test_the_choice_is_measured_once_per_machine_and_shape(cache, monkeypatch):
    calls = timings(monkeypatch, 1.0, 0.5)
    first = precision.choose(64, 128, 512, 256, 2, use_gpu=False)
    assert precision.choose(64, 128, 512, 256, 2, use_gpu=False) == first and len(calls) == 2
    precision.choose(64, 128, 512, 512, 2, use_gpu=False)  # another batch: measured again
    assert len(calls) == 4 and cache.exists()


def test_a_gpu_takes_bf16_without_measuring(cache, monkeypatch):
    calls = timings(monkeypatch, 1.0, 2.0)
    assert precision.choose(64, 128, 512, 256, 2, use_gpu=True).precision == "bf16" and calls == []


def test_the_shapes_cover_forward_and_backward_of_each_projection():
    shapes = precision.matmul_shapes(8, 16, 32, 4)
    assert (4, 8, 32) in shapes and (4, 32, 8) in shapes and (8, 4, 32) in shapes and len(shapes) == 12


def test_auto_is_resolved_before_planning_and_keeps_the_fingerprints_of_the_same_explicit_setting(tmp_path, cache,
                                                                                                 monkeypatch):
    from pipelines import dag
    from conf.compose import compose_config

    timings(monkeypatch, 1.0, 0.5)  # bf16 measured twice as fast
    overrides = ["+experiment=compare", f"paths.root={tmp_path}"]
    auto, chosen = precision.resolve(compose_config(overrides + ["finetunes.full.precision=fp32"]))
    assert auto.pretrain.precision == "bf16" and auto.finetunes["lora"].precision == "bf16"
    assert auto.finetunes["full"].precision == "fp32" and "finetunes.full" not in chosen  # explicit wins
    assert set(chosen) >= {"pretrain", "finetunes.lora"}
    explicit = compose_config(overrides + ["finetunes.full.precision=fp32"] +
                              [f"{key}.precision=bf16" for key in chosen])
    fingerprints = lambda cfg: {p.step.name: p.fingerprint for p in dag.plan(cfg, tmp_path)}
    assert fingerprints(auto) == fingerprints(explicit)
    timings(monkeypatch, 1.0, 3.0)  # another machine, where bf16 is slower: another pretrained model
    cache.unlink()
    slower, _ = precision.resolve(compose_config(overrides))
    assert slower.pretrain.precision == "fp32" and fingerprints(slower)["pretrain"] != fingerprints(explicit)["pretrain"]
