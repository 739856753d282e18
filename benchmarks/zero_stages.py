"""ZeRO stages 0, 1, 2 and 3 at two workers, against plain PyTorch DDP over gloo: step time and
peak memory per worker, measured in the same run.

Every variant trains the same Llama model (conf/model/<--model>.yaml) on the same seeded random
token ids (vocabulary 4,096, 256 positions: no tokenizer or ingest needed), with the same
micro-batch per worker, one torch thread per worker, the same precision (bf16 autocast where the
CPU supports it) and the same AdamW hyperparameters. Each variant is a fresh Ray Train job of two
workers with one CPU each, launched as the pipeline launches training (TorchTrainer, gloo). The
ZeRO variants use the pipeline's own engine set-up (tasks.training.init_engine); the reference is
torch DistributedDataParallel with AdamW and gradient clipping. DDP runs first and last and the
two are averaged, because these machines are noisy.

Step time: per worker, the median wall time of forward + backward + optimizer step after
--warmup steps. Peak memory: per worker, the peak resident set size of the worker process minus
its resident set at the start of the worker function, after imports. The peak is the kernel's
high-water mark (VmHWM in /proc/self/status, the figure getrusage's ru_maxrss reports for a live
process), reset at that baseline by writing 5 to /proc/self/clear_refs (Linux >= 4.0) so that
imports and Ray start-up do not count; model set-up, engine set-up and training all do. The table
shows the larger value of the two workers.

    python benchmarks/zero_stages.py [--model small] [--steps 20] [--precision bf16]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from conf.schema import ModelConfig, PretrainConfig  # noqa: E402
from pipelines import executor  # noqa: E402
from tasks import pretrain, training  # noqa: E402
from tasks.common import write_json  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
WORLD = 2
VOCAB_SIZE, SEQ_LEN, PAD_ID, EOS_ID = 4096, 256, 0, 1
# DDP first and last (averaged); ZeRO-N runs with zero_stage N, DDP ignores the field.
RUNS = [("DDP", None), ("ZeRO-0", 0), ("ZeRO-1", 1), ("ZeRO-2", 2), ("ZeRO-3", 3), ("DDP", None)]


def load_model_config(name: str) -> ModelConfig:
    """The YAML merged onto the schema, so a wrong key or type fails here with its name."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def train_config(zero_stage: int, args) -> PretrainConfig:
    return PretrainConfig(zero_stage=zero_stage, precision=args.precision, micro_batch_size=args.batch,
                          global_batch_size=WORLD * args.batch, max_steps=args.steps,
                          cpus_per_worker=1, num_workers=WORLD)


# ---------------------------------------------------------------- inside each Ray Train worker

def rss_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def start_memory_window() -> int:
    """Reset the high-water mark to the current resident set; returns that baseline in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kb("VmRSS")


def ddp_step(model: torch.nn.Module, cfg: PretrainConfig):
    """Plain PyTorch: DDP, with the optimizer init_engine builds (AdamW, no decay on norms and
    biases, betas, warm-up/cosine schedule) and the clipping DeepSpeed applies."""
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer, scheduler = training.build_optimizer(model, cfg)

    def step(ids: torch.Tensor) -> None:
        with training.autocast(cfg):
            loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def zero_step(model: torch.nn.Module, cfg: PretrainConfig):
    """The pipeline's engine set-up and step, as tasks.training.train runs it."""
    engine = training.init_engine(model, cfg, world=WORLD)

    def step(ids: torch.Tensor) -> None:
        with training.autocast(cfg):
            loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    return step


def worker(spec: dict) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported, else it probes for accelerators
    import deepspeed  # noqa: F401  (imported before the baseline: its memory is the same for every variant)

    cfg: PretrainConfig = spec["cfg"]
    training.setup_worker(cfg)  # one torch thread, seeds
    rank, world = training.rank_and_world()
    num_rows = cfg.max_steps * cfg.global_batch_size
    tokens = np.random.default_rng(cfg.seed).integers(0, VOCAB_SIZE, (num_rows, SEQ_LEN), dtype=np.int64)

    baseline_kb = start_memory_window()
    model = pretrain.build_model(spec["model"], VOCAB_SIZE, PAD_ID, EOS_ID)
    step = ddp_step(model, cfg) if spec["zero_stage"] is None else zero_step(model, cfg)
    seconds = []
    for index in range(cfg.max_steps):
        ids = torch.from_numpy(tokens[np.sort(training.sample_rows(index, 0, rank, world, cfg, num_rows))])
        started = time.perf_counter()
        step(ids)
        seconds.append(time.perf_counter() - started)
    result = {"step_s": statistics.median(seconds[spec["warmup"]:]),
              "peak_mb": (rss_kb("VmHWM") - baseline_kb) / 1024}
    write_json(Path(spec["results_dir"]) / f"{spec['run']}-rank{rank}.json", result)


# ---------------------------------------------------------------- driver

def run_variant(run: str, zero_stage: int | None, args, model_cfg: ModelConfig, tmp: Path) -> list[dict]:
    """One Ray Train job of two workers (fresh processes, so peaks do not carry over); per-rank results."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    results_dir = tmp / "results"
    results_dir.mkdir(exist_ok=True)
    spec = {"run": run, "zero_stage": zero_stage, "cfg": train_config(zero_stage or 0, args),
            "model": model_cfg, "warmup": args.warmup, "results_dir": str(results_dir)}
    TorchTrainer(
        worker, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=WORLD, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=run, storage_path=str(tmp / "ray_train")),
    ).fit()
    return [json.loads((results_dir / f"{run}-rank{rank}.json").read_text()) for rank in range(WORLD)]


def measure_all(args, model_cfg: ModelConfig) -> dict[str, list[list[dict]]]:
    """Every run in RUNS on one local Ray; results by variant name (DDP has two runs)."""
    import ray

    ray.init(num_cpus=WORLD, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
             runtime_env={"env_vars": executor.WORKER_ENV}, logging_config=ray.LoggingConfig(log_level="ERROR"))
    results: dict[str, list[list[dict]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for index, (name, zero_stage) in enumerate(RUNS):
                print(f"[{index + 1}/{len(RUNS)}] {name}", flush=True)
                runs = results.setdefault(name, [])
                runs.append(run_variant(f"{index}-{name}", zero_stage, args, model_cfg, Path(tmp)))
    finally:
        ray.shutdown()
    return results


def summarise(runs: list[list[dict]]) -> dict:
    """Max over ranks within a run (the slower / larger worker), mean over repeated runs."""
    step_s = [max(rank["step_s"] for rank in ranks) for ranks in runs]
    peak_mb = [max(rank["peak_mb"] for rank in ranks) for ranks in runs]
    return {"step_s": statistics.mean(step_s), "peak_mb": statistics.mean(peak_mb), "runs": runs}


def print_table(args, results: dict) -> None:
    rows = {name: summarise(runs) for name, runs in results.items()}
    ddp = rows["DDP"]
    tokens_per_step = WORLD * args.batch * SEQ_LEN
    bf16 = args.precision == "bf16" and training.bf16_autocast_available()
    print(f"model={args.model} workers={WORLD} threads/worker=1 micro_batch={args.batch}x{SEQ_LEN} "
          f"precision={'bf16 autocast' if bf16 else 'fp32'} steps={args.steps} (median after {args.warmup})")
    print(f"{'variant':<8} {'step s':>7} {'tokens/s':>9} {'time/DDP':>9} {'peak MB':>8} {'mem/DDP':>8}  "
          f"peak MB rank0/rank1 (per run)")
    for name, row in rows.items():
        per_rank = ", ".join("/".join(f"{rank['peak_mb']:.0f}" for rank in ranks) for ranks in row["runs"])
        print(f"{name:<8} {row['step_s']:>7.3f} {tokens_per_step / row['step_s']:>9,.0f} "
              f"{row['step_s'] / ddp['step_s']:>9.3f} {row['peak_mb']:>8.0f} {row['peak_mb'] / ddp['peak_mb']:>8.3f}  "
              f"{per_rank}")
    before, after = (max(rank["step_s"] for rank in ranks) for ranks in results["DDP"])
    print(f"DDP step s before {before:.3f}, after {after:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per worker")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    model_cfg = load_model_config(args.model)
    results = measure_all(args, model_cfg)
    print_table(args, results)


if __name__ == "__main__":
    main()
