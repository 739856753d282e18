"""Resumable training state. DeepSpeed writes each checkpoint into its own tag directory; rank 0
then adds a completion record (every file with size and SHA-256) and only then moves the
`latest` pointer, so a save cut short never replaces the previous checkpoint. Before loading,
the record is checked against the files: a damaged newest checkpoint is reported and the
previous valid one is used. Files are loaded with `torch.load(weights_only=True)` and an
allow-list of the plain types DeepSpeed stores, so a planted pickle cannot run code.

A checkpoint written by a different number of workers is first converted to DeepSpeed's
universal format (per-parameter fp32 weights and optimizer state), which loads at any
data-parallel degree.

Where the nodes share no directory, the context's Mirror (tasks/common.py) keeps every checkpoint
in the store: each node uploads its own ranks' shards, and a resumed attempt downloads them.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tasks.common import Mirror, UserError, files_problem, first_line, record_files, write_json
from tasks.distributed import all_reduce_sum, barrier, rank_and_world
from tasks.earlystop import FRESH_STATE
from tasks.trainlog import TrainLog

COMPLETE = "_complete.json"
LATEST = "latest"
BEST = "best"  # tasks/earlystop.py keeps the best weights there


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds objects outside the allow-list (it could run code when unpickled)."""


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def gather_records(mine: dict) -> dict:
    """Every node's files of one checkpoint: where nodes share no directory, each holds its own ranks' shards."""
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {name: record for part in parts for name, record in part.items()}


def save(engine, checkpoint_dir: Path, step: int, keep: int, rank: int, world: int, state: dict,
         mirror: Mirror) -> None:
    """All ranks write their shards (with `state` as client state); rank 0 records them, then
    moves `latest` and prunes old tags. The mirror keeps the files for the next attempt: each node
    uploads its shards, rank 0 its loss history and best weights, before the record (which lists
    every node's files) is written and uploaded."""
    tag = tag_name(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False,
                           client_state={**state, "step": step})
    barrier()
    tag_dir = checkpoint_dir / tag
    files = gather_records(record_files(tag_dir, skip=COMPLETE) if mirror.tends(rank) else {})
    if mirror.tends(rank):
        mirror.upload(tag_dir, replace=False)
    if rank == 0:
        mirror.upload(checkpoint_dir.parent, exclude=(checkpoint_dir.name,))
        if (checkpoint_dir / BEST).is_dir():
            mirror.upload(checkpoint_dir / BEST)
    barrier()
    if rank == 0:
        write_json(tag_dir / COMPLETE, {"step": step, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
                                        "files": files})
        pointer = checkpoint_dir / f".{LATEST}.tmp"
        pointer.write_text(tag)
        os.replace(pointer, checkpoint_dir / LATEST)
        mirror.upload(tag_dir / COMPLETE)
        for old in [t for t in mirror.folders(checkpoint_dir) if t.startswith("step")][:-keep]:
            mirror.remove(checkpoint_dir / old)
    if mirror.tends(rank):
        for old in sorted(checkpoint_dir.glob("step*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def fetch(mirror: Mirror, checkpoint_dir: Path, rank: int) -> None:
    """Before resuming, each node's copy is made the kept one: local checkpoints the mirror lacks (or
    holds unfinished) are dropped, the newest intact kept one is downloaded, and so are the loss
    history and best weights. A replaced node starts from nothing; on a shared directory nothing moves."""
    if mirror.tends(rank):
        stored = [t for t in mirror.folders(checkpoint_dir) if t.startswith("step") and mirror.has(checkpoint_dir / t / COMPLETE)]
        mirror.drop_unkept(checkpoint_dir, stored, "step*")
        mirror.download(checkpoint_dir.parent, exclude=(checkpoint_dir.name,))
        mirror.download(checkpoint_dir / BEST)
        for tag in reversed(stored):
            mirror.download(checkpoint_dir / tag, replace=False)
            if problem(checkpoint_dir / tag) is None:
                break
    barrier()


def problem(tag_dir: Path) -> str | None:
    """Why this checkpoint cannot be used, or None when every recorded file is intact."""
    import json

    try:
        record = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return "no completion record (the save was cut short)"
    return files_problem(tag_dir, record["files"])


def newest_valid(checkpoint_dir: Path, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest intact checkpoint; each damaged newer one is reported."""
    import json

    for tag_dir in sorted(checkpoint_dir.glob("step*"), reverse=True):
        reason = problem(tag_dir)
        if reason is None:
            return tag_dir, json.loads((tag_dir / COMPLETE).read_text())
        warn(f"checkpoint {tag_dir.name} is not usable: {reason}; trying an older one")
    return None


def record_of(checkpoint_dir: Path, rank: int, warn: Callable[[str], None]) -> dict | None:
    """Rank 0 picks the checkpoint to resume from; every rank gets its completion record."""
    import json

    chosen = newest_valid(checkpoint_dir, warn) if rank == 0 and checkpoint_dir.is_dir() else None
    step = int(all_reduce_sum([chosen[1]["step"] + 1 if chosen and rank == 0 else 0])[0]) - 1  # rank 0's choice
    if step < 0:
        return None
    return json.loads((checkpoint_dir / tag_name(step) / COMPLETE).read_text())


# Types DeepSpeed and torch put in checkpoints besides tensors and builtins.
def allowed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [argparse.Namespace, ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address,
            torch.optim.lr_scheduler.LambdaLR, set, frozenset]


@contextlib.contextmanager
def weights_only_loading():
    """Every torch.load inside (DeepSpeed's included) refuses objects outside the allow-list."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except Exception as error:  # torch reports the refused global in an UnpicklingError
            if "Weights only load failed" in str(error) or "Unsupported global" in str(error):
                source = args[0] if args else kwargs.get("f")
                first = str(error).split("\n\n")[1] if "\n\n" in str(error) else first_line(error)
                raise UnsafeCheckpointError(f"{source}: refused to unpickle it ({first.strip()[:200]})") from None
            raise

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        torch.load = original


def to_universal(tag_dir: Path, rank: int, mirror: Mirror) -> Path:
    """Convert a checkpoint written at another data-parallel degree (rank 0 does the work and keeps
    it; the other nodes download it)."""
    from deepspeed.checkpoint.ds_to_universal import main as convert

    out_dir = tag_dir.parent / f"universal-{tag_dir.name}"
    if rank == 0 and not (out_dir / COMPLETE).exists():
        shutil.rmtree(out_dir, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with weights_only_loading():
            convert(args)
        write_json(out_dir / COMPLETE, {"source": tag_dir.name})
        mirror.upload(out_dir)
    barrier()
    if rank != 0 and mirror.tends(rank):
        mirror.download(out_dir, replace=False)
    barrier()
    return out_dir


def load(engine, checkpoint_dir: Path, record: dict, rank: int, world: int, warn: Callable[[str], None],
         mirror: Mirror) -> dict:
    """Load the chosen checkpoint into the engine; returns its client state."""
    tag_dir = checkpoint_dir / tag_name(record["step"])
    tag = tag_dir.name
    if record["world_size"] != world and record["zero_stage"] >= 1:
        if rank == 0:
            warn(f"checkpoint {tag} was written by {record['world_size']} worker(s), resuming on {world}: "
                 f"converting it to DeepSpeed's universal format")
        tag = to_universal(tag_dir, rank, mirror).name
        engine._config.load_universal_checkpoint = True  # DeepSpeed reads this flag when loading
    with weights_only_loading():
        path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"checkpoint {tag_dir} could not be loaded")
    return client_state


def restore(engine, checkpoint_dir: Path, log: TrainLog) -> dict:
    """Load the newest valid checkpoint if there is one; returns the training state to continue from."""
    fresh = {"step": 0, "window_loss": 0.0, "window_steps": 0, "skipped_steps": 0, **FRESH_STATE}
    rank, world = rank_and_world()
    warn = log.ctx.say if log.rank == 0 else (lambda _message: None)
    fetch(log.ctx.mirror, checkpoint_dir, rank)
    record = record_of(checkpoint_dir, rank, warn)
    if record is None:
        log.resume_at(0)  # an attempt that died before its first checkpoint may have left history
        return fresh
    client_state = load(engine, checkpoint_dir, record, rank, world, warn, log.ctx.mirror)
    torch.set_rng_state(client_state["torch_rng"])
    state = {key: client_state.get(key, value) for key, value in fresh.items()}
    log.resume_at(state["step"])
    return state


def remove(checkpoint_dir: Path, rank: int, mirror: Mirror) -> None:
    """Once the step's result is written, the resumable state is no longer needed (each node's copy)."""
    barrier()
    if mirror.tends(rank):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
