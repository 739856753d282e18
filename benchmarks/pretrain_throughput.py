"""Pretrain stage tokens/s against a bare PyTorch training loop, measured in the same run.

Both train the same Llama model on the same packed tokens with the same batch size, torch
threads and precision (bf16 autocast where the CPU supports it). The stage runs as the
pipeline runs it: a Ray Train worker with DeepSpeed ZeRO (stage from --zero-stage). The bare
loop is measured before and after the stage and averaged, because these machines are noisy.

    python benchmarks/pretrain_throughput.py [--steps 40] [--model small] [--zero-stage 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from conf.schema import Config, register_configs  # noqa: E402
from pipelines import artifacts, dag, executor, storage  # noqa: E402
from tasks import ingest, pretrain, tokenize, training  # noqa: E402
from tasks.common import TaskContext  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"


def make_config(args, root: Path) -> Config:
    register_configs()
    overrides = [f"model={args.model}", f"paths.root={root}", f"pretrain.max_steps={args.steps}",
                 f"pretrain.micro_batch_size={args.batch}", f"pretrain.global_batch_size={args.batch}",
                 f"pretrain.zero_stage={args.zero_stage}", f"pretrain.precision={args.precision}",
                 f"pretrain.cpus_per_worker={args.threads}", "pretrain.num_workers=1", "pretrain.warmup_steps=2",
                 f"pretrain.log_every={args.log_every}", f"pretrain.eval_every={args.steps}", "pretrain.eval_batches=1",
                 "data.max_bytes=2000000"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def prepare_tokens(cfg: Config, root: Path) -> Path:
    ingest_dir, tokenize_dir = root / "prepared" / "ingest", root / "prepared" / "tokenize"
    ingest_dir.mkdir(parents=True), tokenize_dir.mkdir()
    ingest.run(cfg.data, {}, ingest_dir, TaskContext("ingest"))
    tokenize.run(cfg.tokenizer, {"ingest": ingest_dir}, tokenize_dir, TaskContext("tokenize"))
    return tokenize_dir


def bare_loop(cfg: Config, tokenize_dir: Path, log_every: int) -> float:
    """Plain PyTorch: model, AdamW, autocast, the same batches; tokens/s after the first window."""
    torch.set_num_threads(cfg.pretrain.cpus_per_worker)
    torch.manual_seed(0)
    meta = json.loads((tokenize_dir / "meta.json").read_text())
    rows = tokenize.load_split(tokenize_dir, "train")
    model = pretrain.build_model(cfg.model, meta["vocab_size"], meta["pad_id"], meta["eos_id"])
    optimizer, _ = training.build_optimizer(model, cfg.pretrain)
    tokens_per_step = cfg.pretrain.global_batch_size * meta["seq_len"]
    start = None
    for step in range(cfg.pretrain.max_steps):
        if step == log_every:
            start = time.perf_counter()
        ids = torch.from_numpy(np.asarray(rows[training.sample_rows(step, 0, 0, 1, cfg.pretrain, len(rows))], dtype=np.int64))
        with training.autocast(cfg.pretrain):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.pretrain.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (cfg.pretrain.max_steps - log_every) * tokens_per_step / (time.perf_counter() - start)


def pipeline_stage(cfg: Config, root: Path, tokenize_dir: Path) -> float:
    """The pretrain step exactly as the executor runs it (Ray Train + DeepSpeed)."""
    item = next(p for p in dag.plan(cfg, root) if p.step.name == "pretrain")
    item.upstream = {"tokenize": ""}  # the step reads <prepared>/tokenize
    base = {"step": item.step.base, "fingerprint": item.fingerprint, "started_at": time.time()}
    attempt = storage.SharedRoot(tokenize_dir.parent, None).attempt(item, base, "benchmark")
    executor.start_ray(cfg)
    try:
        metrics = executor.run_training_step(item, attempt, lambda *a, **k: None, root)["metrics"]
    finally:
        executor.stop_ray()
    out_dir = artifacts.step_dir(tokenize_dir.parent, item.step.base, item.fingerprint)
    history = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return statistics.mean(r["tokens_per_s"] for r in history[1:]) if len(history) > 1 else metrics["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = make_config(args, root)
        tokenize_dir = prepare_tokens(cfg, root)
        bare_before = bare_loop(cfg, tokenize_dir, args.log_every)
        stage = pipeline_stage(cfg, root, tokenize_dir)
        bare_after = bare_loop(cfg, tokenize_dir, args.log_every)
        meta = json.loads((tokenize_dir / "meta.json").read_text())
    bare = (bare_before + bare_after) / 2
    torch.set_num_threads(args.threads)
    peak = training.measure_peak_flops(cfg.pretrain)
    fpt = pretrain.flops_per_token(cfg.model, meta["vocab_size"], meta["seq_len"])
    print(f"model={args.model} batch={args.batch}x{cfg.tokenizer.seq_len} threads={args.threads} "
          f"precision={args.precision} zero={args.zero_stage} steps={args.steps}")
    print(f"bare PyTorch loop : {bare:,.0f} tokens/s (before {bare_before:,.0f}, after {bare_after:,.0f})")
    print(f"pretrain stage    : {stage:,.0f} tokens/s (Ray Train + DeepSpeed ZeRO-{args.zero_stage})")
    print(f"ratio stage/bare  : {stage / bare:.3f}")
    print(f"matmul peak       : {peak / 1e9:,.1f} GFLOP/s ({args.precision}, {args.threads} threads, measured now)")
    print(f"MFU stage / bare  : {stage * fpt / peak:.3f} / {bare * fpt / peak:.3f} "
          f"({fpt:.3g} training FLOPs per token)")


if __name__ == "__main__":
    main()
