"""Runs the pretrain step in this process as one gloo rank; the resume test starts, kills and
restarts it.  python -m tests.integration.resume_helper TOKENIZE_DIR OUT_DIR PORT"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

from conf.schema import PretrainStepConfig
from tasks import pretrain
from tasks.common import TaskContext
from tests.conftest import compose_config

OVERRIDES = ["+experiment=tiny", "pretrain.num_workers=1", "pretrain.cpus_per_worker=1", "pretrain.precision=fp32",
             "pretrain.max_steps=300", "pretrain.warmup_steps=5", "pretrain.log_every=5", "pretrain.eval_every=50",
             "pretrain.checkpoint_every=10"]

if __name__ == "__main__":
    tokenize_dir, out_dir, port = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = compose_config(OVERRIDES)
    out_dir.mkdir(exist_ok=True)
    pretrain.train_worker(PretrainStepConfig(cfg.model, cfg.pretrain), {"tokenize": tokenize_dir}, out_dir,
                          TaskContext("pretrain"))
    dist.destroy_process_group()
