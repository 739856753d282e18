"""The memory estimate of a training worker (pipelines/memory.py: training_memory), checked against
its closed form and the real parameter counts, and the one-line stop before any Ray work when a
worker cannot hold it."""
from __future__ import annotations

import dataclasses
import re
from collections import namedtuple

import pytest

from pipelines import validate as checks
from pipelines.memory import GiB, num_adapter_parameters, training_memory, worker_memory
from tasks.common import UserError
from tasks.pretrain import build_model, count_parameters, num_parameters
from tests.conftest import compose_config

VOCAB = 4096  # conf/tokenizer/bpe.yaml


def test_the_quickstart_fits_easily_and_a_batch_of_100000_does_not():
    cfg = compose_config(["+experiment=quickstart"])
    assert num_parameters(cfg.model, VOCAB) == count_parameters(build_model(cfg.model, VOCAB, 0, 2)) == 4_212_992
    h, heads, layers, s, b, p = 256, 4, 4, 256, 16, 4_212_992
    parts = training_memory(cfg.pretrain, cfg.model, VOCAB, s)  # one worker: ZeRO shards nothing
    assert parts == {"params": (4 + 4) * p, "optimizer": 8 * p,
                     "activations": layers * (34 * h + 5 * heads * s) * s * b + 8 * s * b * VOCAB}
    assert sum(parts.values()) < 0.5 * GiB
    huge = dataclasses.replace(cfg.pretrain, micro_batch_size=100_000)
    assert sum(training_memory(huge, cfg.model, VOCAB, s).values()) > 1024 * GiB


def test_memory_grows_with_the_batch_and_falls_with_the_zero_stage():
    cfg = compose_config(["+experiment=quickstart", "pretrain.num_workers=4", "pretrain.global_batch_size=128"])

    def total(**changes) -> float:
        return sum(training_memory(dataclasses.replace(cfg.pretrain, **changes), cfg.model, VOCAB, 256).values())

    assert total(micro_batch_size=8) < total(micro_batch_size=16) < total(micro_batch_size=32)
    assert total(zero_stage=0) > total(zero_stage=1) > total(zero_stage=2) > total(zero_stage=3)
    assert total(activation_checkpointing=True) < total() < total(precision="fp32")


@pytest.mark.parametrize("overrides", [
    ["finetune=lora"], ["finetune=lora", "model.num_kv_heads=2", "finetune.lora.modules_to_save=[]"],
    ["finetune=prefix"], ["finetune=prefix", "model.num_kv_heads=2", "finetune.prefix.prefix_projection=true"],
])
def test_adapter_parameters_are_what_peft_trains(overrides):
    from peft import get_peft_model

    from tasks import finetune

    cfg = compose_config(["+experiment=tiny", *overrides])
    adapter = finetune.FINETUNE_METHODS[cfg.finetune.method](cfg.finetune)
    model = get_peft_model(build_model(cfg.model, VOCAB, 0, 2), adapter)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert num_adapter_parameters(cfg.finetune, cfg.model, VOCAB) == trained
    assert num_adapter_parameters(dataclasses.replace(cfg.finetune, method="full"), cfg.model, VOCAB) == 0


def test_a_worker_has_its_share_of_this_machine_and_a_cluster_is_not_checked(monkeypatch):
    import psutil

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: namedtuple("svmem", "available")(8 * GiB))
    cfg = compose_config(["+experiment=tiny"])  # pretrain: 2 workers
    assert worker_memory(cfg, cfg.pretrain) == 4 * GiB
    assert worker_memory(compose_config(["+experiment=tiny", "ray.address=auto"]), cfg.pretrain) is None


@pytest.mark.parametrize("overrides,message", [
    (["+experiment=quickstart", "pretrain.micro_batch_size=1024", "pretrain.global_batch_size=1024"],
     "pretrain: about 21.6 GiB per worker (params 0.03, optimizer 0.03, activations 21.50 for micro_batch_size=1024 "
     "x seq_len=256) but a worker has about 2.0 GiB here; lower pretrain.micro_batch_size or use a smaller model / "
     "higher zero_stage"),
    (["+experiment=compare", "finetunes.full.micro_batch_size=512", "finetunes.full.global_batch_size=512"],
     "finetunes.full: about 4.8 GiB per worker (params 0.03, optimizer 0.03, activations 4.75 for micro_batch_size=512 "
     "x max_length=128)"),
])
def test_a_step_a_worker_cannot_hold_stops_with_one_line(monkeypatch, overrides, message):
    monkeypatch.setattr(checks, "worker_memory", lambda cfg, train: 2 * GiB)
    checks.validate(compose_config(["+experiment=quickstart"]))
    with pytest.raises(UserError, match="^" + re.escape(message)):
        checks.validate(compose_config(overrides))
