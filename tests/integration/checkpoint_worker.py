"""The training loop on a tiny Llama and seeded random tokens, as one rank of a gloo group.
The checkpoint tests run it in their own process (world 1) or as several processes.

    python -m tests.integration.checkpoint_worker OUT_DIR RANK WORLD PORT ZERO_STAGE STOP_AT [STORE_URI NODE_ROOT]

With STORE_URI the rank acts as a node that shares no directory with the others: OUT_DIR is below
its own NODE_ROOT, and checkpoints go through the store (pipelines/store.NodeMirror).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

from conf.schema import ModelConfig, PretrainConfig
from tasks import pretrain, training
from tasks.common import Mirror, SharedFolder, StopChannel, StopFlag, TaskContext

MODEL = ModelConfig(name="tiny", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                    max_position_embeddings=32)
VOCAB, SEQ_LEN = 97, 16
BASE = PretrainConfig(precision="fp32", micro_batch_size=2, global_batch_size=4, max_steps=8, warmup_steps=1,
                      log_every=1, eval_every=4, eval_batches=1, checkpoint_every=2, cpus_per_worker=1)
ROWS = np.random.default_rng(0).integers(0, VOCAB, (64, SEQ_LEN), dtype=np.uint16)


def run(out_dir: Path, cfg: PretrainConfig, nan_steps=(), stop_at: int = 0, on_step=None,
        mirror: Mirror = SharedFolder(), stop: StopChannel | None = None) -> tuple[dict, object]:
    """Train; a NaN loss at each step in nan_steps; a stop request (as SIGTERM makes) during step
    stop_at (1-based); on_step(step, engine) before each step. `stop`: the context's stop channel
    (a StopFlag by default). Returns (metrics, engine)."""
    stop = stop or StopFlag()
    training.setup_worker(cfg)
    rank, world = training.rank_and_world()
    engine = training.init_engine(pretrain.build_model(MODEL, VOCAB, 0, 1), cfg, world)

    def train_batch(step: int, micro: int) -> dict:
        if micro == 0 and on_step:
            on_step(step, engine)
        if stop_at and step + 1 == stop_at:
            stop.request()
        rows = ROWS[training.sample_rows(step, micro, rank, world, cfg, len(ROWS))]
        return {"input_ids": torch.from_numpy(rows.astype(np.int64)), "nan": step in nan_steps}

    def forward(batch: dict) -> torch.Tensor:
        loss = engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        return loss * float("nan") if batch.get("nan") else loss

    eval_batches = [{"input_ids": torch.from_numpy(ROWS[:2].astype(np.int64)), "weight": 2}]
    log = training.TrainLog(TaskContext("pretrain", mirror=mirror, stop=stop), rank, cfg.max_steps, cfg.global_batch_size * SEQ_LEN,
                            out_dir / "train_log.jsonl")
    metrics = training.train(engine, cfg, forward, train_batch, eval_batches, log, out_dir / "checkpoints")
    return metrics, engine


if __name__ == "__main__":
    import torch.distributed as dist

    out_dir, rank, world, port, stage, stop_at = sys.argv[1], *map(int, sys.argv[2:7])
    mirror, own_node = SharedFolder(), len(sys.argv) > 7
    if own_node:
        from pipelines.store import NodeMirror

        mirror = NodeMirror(sys.argv[7], sys.argv[8])
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(0 if own_node else rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = dataclasses.replace(BASE, zero_stage=stage, num_workers=world)
    metrics, _ = run(Path(out_dir), cfg, stop_at=stop_at, mirror=mirror)
    if rank == 0:
        print("metrics", metrics, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # gloo's threads sometimes abort the interpreter's teardown ("terminate called without an
    # active exception"); everything is written and flushed by now.
    sys.stdout.flush()
    os._exit(0)
