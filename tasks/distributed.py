"""What the training machinery needs from torch.distributed and DeepSpeed, below the training loop,
checkpoints and early stopping alike: ranks, collectives, gathered ZeRO-3 parameters, and DeepSpeed
imported without what it never uses here. Imports no other task module, so everything that trains
can import it (tasks/training.py, checkpoints.py, earlystop.py, finetune.py, regularize.py).

Runs inside each data-parallel worker; torch.distributed is initialised by the launcher (Ray Train).
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def collective_device() -> str:
    """NCCL reduces GPU tensors only; gloo CPU tensors."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return "cuda"
    return "cpu"


def all_reduce_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


UNUSED_BY_DEEPSPEED_HERE = ("mlflow",)
"""Imported by DeepSpeed's autotuner if installed; used only by autotuning runs."""


class NotMuon:
    """Stands in for DeepSpeed's Muon optimizer, which ZeRO imports on every gradient reduction only
    to test `isinstance` and `use_muon`: importing the real modules runs torch.compile decorators that
    load torch's compiler stack (about 6 s of CPU per training worker on 2 cores). lmforge's
    optimizer is AdamW (training.build_optimizer), so the Muon code is never called."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("lmforge trains with AdamW; DeepSpeed's Muon optimizer is not loaded")


def muon_update(*args, **kwargs):
    raise RuntimeError("lmforge trains with AdamW; DeepSpeed's Muon update is not loaded")


MUON_STAND_INS = {"deepspeed.runtime.zero.muon.muon_optimizer": {"MuonWithAuxAdam": NotMuon},
                  "deepspeed.runtime.zero.muon.original_muon": {"muon_update": muon_update}}


def import_deepspeed():
    """DeepSpeed without the imports it makes but never needs in training (most of a tiny training
    step's start-up)."""
    for name, attributes in MUON_STAND_INS.items():
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name, NotMuon.__doc__)
            vars(sys.modules[name]).update(attributes)
    blocked = [name for name in UNUSED_BY_DEEPSPEED_HERE if name not in sys.modules]
    sys.modules.update(dict.fromkeys(blocked))  # `import` of a None entry raises ImportError, which DeepSpeed expects
    try:
        import deepspeed
    finally:
        for name in blocked:
            del sys.modules[name]  # importable again for whoever needs it later
    return deepspeed


@contextlib.contextmanager
def full_parameters(engine):
    """All parameters materialised on every rank (ZeRO-3 partitions them); a no-op for stages 0-2."""
    if engine.zero_optimization_stage() == 3:
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module
