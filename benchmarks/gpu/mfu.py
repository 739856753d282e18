"""Model FLOP utilisation of the 125M and 350M models in bf16 on one GPU.

The loop under test is the pretrain step's own (`tasks.training.train` over a DeepSpeed ZeRO
engine (--zero-stage) with bf16 weights and fp32 master weights), eager and with `pretrain.compile=true`. The
reference is a bare PyTorch loop (AMP autocast, fused AdamW) on the same model, batches and
precision, measured in the same run. Tokens/s is the median over logging windows after the
first (start-up and compilation are left out). MFU = tokens/s x training FLOPs per token
(tasks.pretrain.flops_per_token) / peak, against two peaks: a bf16 matrix product measured at
the start (8192^3), and the chip's nominal dense bf16 figure (--nominal-tflops).

One prepared script, about 6-8 minutes on an H200:
    python benchmarks/gpu/mfu.py [--models 125m,350m] [--steps 30] [--micro-batch 16] [--seq-len 2048]
A CPU smoke run of the same code:
    python benchmarks/gpu/mfu.py --device cpu --models tiny --seq-len 128 --micro-batch 4 --steps 10 --variants pipeline,bare
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from conf.schema import ModelConfig, PretrainConfig  # noqa: E402
from tasks import pretrain, training  # noqa: E402
from tasks.common import TaskContext  # noqa: E402

VOCAB = 32000


def model_config(name: str) -> ModelConfig:
    values = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in values.items() if k in names})


def measured_peak(device: str, size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a bf16 square matrix product (fp32 on a CPU without bf16 support)."""
    if device == "cpu":
        return training.measure_peak_flops(PretrainConfig(precision="bf16"), size=1024)
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def train_config(args, compile_model: bool) -> PretrainConfig:
    return PretrainConfig(zero_stage=args.zero_stage, precision="bf16", micro_batch_size=args.micro_batch,
                          global_batch_size=args.micro_batch, max_steps=args.steps, warmup_steps=2,
                          log_every=args.log_every, eval_every=args.steps, eval_batches=1, checkpoint_every=0,
                          use_gpu=args.device == "cuda", compile=compile_model, cpus_per_worker=args.threads)


def pipeline_loop(args, model_cfg: ModelConfig, rows: np.ndarray, compile_model: bool, work_dir: Path) -> float:
    """The pretrain step's loop and engine, as a Ray Train worker runs it (one rank)."""
    cfg = train_config(args, compile_model)
    training.setup_worker(cfg)
    model = pretrain.build_model(model_cfg, VOCAB, 0, 1)
    engine = training.init_engine(model, cfg, world=1)
    as_batch = lambda ids: {"input_ids": torch.from_numpy(ids.astype(np.int64)), "weight": len(ids)}
    forward = lambda batch: engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    train_batch = lambda step, micro: as_batch(rows[training.sample_rows(step, micro, 0, 1, cfg, len(rows))])
    history = work_dir / f"history-{time.monotonic_ns()}.jsonl"
    log = training.TrainLog(TaskContext("bench"), 0, cfg.max_steps, cfg.global_batch_size * rows.shape[1], history)
    training.train(engine, cfg, forward, train_batch, [as_batch(rows[: args.micro_batch])], log, work_dir / "ckpt")
    windows = [json.loads(line)["tokens_per_s"] for line in history.read_text().splitlines()][1:]
    return statistics.median(windows)


def bare_loop(args, model_cfg: ModelConfig, rows: np.ndarray, compile_model: bool) -> float:
    """Plain PyTorch AMP: fp32 weights, bf16 autocast, fused AdamW, the same batches."""
    cfg = train_config(args, compile_model)
    torch.manual_seed(0)
    model = pretrain.build_model(model_cfg, VOCAB, 0, 1).to(args.device)
    optimizer, _ = training.build_optimizer(model, cfg, fused=args.device == "cuda")
    step_fn = torch.compile(model) if compile_model else model
    windows, started = [], time.perf_counter()
    for step in range(cfg.max_steps):
        ids = torch.from_numpy(rows[training.sample_rows(step, 0, 0, 1, cfg, len(rows))].astype(np.int64)).to(args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0:
            loss.item()  # waits for the GPU
            now = time.perf_counter()
            windows.append(args.log_every * cfg.global_batch_size * rows.shape[1] / (now - started))
            started = now
    del model, optimizer, step_fn
    return statistics.median(windows[1:])


def release(device: str) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def init_single_process_group(device: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


VARIANTS = {
    "pipeline": ("pretrain loop, DeepSpeed ZeRO bf16", lambda a, m, r, w: pipeline_loop(a, m, r, False, w)),
    "pipeline-compiled": ("same, pretrain.compile=true", lambda a, m, r, w: pipeline_loop(a, m, r, True, w)),
    "bare": ("bare PyTorch AMP loop", lambda a, m, r, w: bare_loop(a, m, r, False)),
    "bare-compiled": ("bare PyTorch AMP loop, torch.compile", lambda a, m, r, w: bare_loop(a, m, r, True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="125m,350m")
    parser.add_argument("--variants", default="pipeline,pipeline-compiled,bare,bare-compiled")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--nominal-tflops", type=float, default=989.0, help="dense bf16 peak of the chip")
    args = parser.parse_args()

    init_single_process_group(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    peak = measured_peak(args.device)
    print(f"{name}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s, nominal {args.nominal_tflops:.0f}; "
          f"torch {torch.__version__}; batch {args.micro_batch}x{args.seq_len}", flush=True)
    rows = np.random.default_rng(0).integers(0, VOCAB, (args.micro_batch * args.steps, args.seq_len), dtype=np.uint16)
    print(f"{'model':6} {'variant':40} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU meas':>9} {'MFU nom':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            model_cfg = model_config(model_name)
            fpt = pretrain.flops_per_token(model_cfg, VOCAB, args.seq_len)
            results = {}
            for variant in args.variants.split(","):
                label, run = VARIANTS[variant]
                try:
                    results[variant] = run(args, model_cfg, rows, Path(tmp))
                except Exception as error:  # one failing variant must not hide the others' figures
                    print(f"{model_name:6} {label:40} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    release(args.device)
                    continue
                release(args.device)
                achieved = results[variant] * fpt
                print(f"{model_name:6} {label:40} {results[variant]:>10,.0f} {achieved / 1e12:>8.1f} "
                      f"{achieved / peak:>9.1%} {achieved / (args.nominal_tflops * 1e12):>8.1%}", flush=True)
            for variant in ("pipeline", "pipeline-compiled"):
                bare = results.get(variant.replace("pipeline", "bare"))
                if variant in results and bare:
                    print(f"{model_name:6} ratio {variant} / {variant.replace('pipeline', 'bare')}: "
                          f"{results[variant] / bare:.3f}", flush=True)


if __name__ == "__main__":
    main()
