"""The training machinery that pretraining and fine-tuning share: DeepSpeed set-up from the typed
config, the deterministic data order, one flat training loop with evaluation and logging, and the
skeleton of a training step's worker (`run_worker`: set up, train, export, drop the checkpoints).

Runs inside each data-parallel worker; torch.distributed is already initialised by the
launcher (Ray Train), and rank 0 alone writes files and logs metrics. The loop learns of stop
requests and takeovers through the context's StopChannel (tasks/common.py), and keeps its
checkpoints through the context's Mirror (tasks/checkpoints.py).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from conf.schema import TrainConfig
from tasks import checkpoints
from tasks.common import Mirror, StopChannel, Superseded, TaskContext, UserError
from tasks.distributed import all_reduce_sum, import_deepspeed, rank_and_world
from tasks.earlystop import BestKeeper
from tasks.trainlog import TrainLog, log_final

CHECKPOINTS = "checkpoints"
"""A training step's resumable state, below its working directory (tasks/checkpoints.py)."""


class NonFiniteError(UserError):
    """Training produced a non-finite loss or weights; nothing non-finite is ever checkpointed."""


def quiet_frameworks() -> None:
    """Keep progress lines readable: framework chatter below warnings is dropped."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def setup_worker(cfg: TrainConfig) -> None:
    quiet_frameworks()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)


def accumulation_steps(cfg: TrainConfig, world: int) -> int:
    per_pass = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_pass:
        raise UserError(f"global_batch_size ({cfg.global_batch_size}) is not a multiple of "
                        f"micro_batch_size x num_workers ({per_pass})")
    return cfg.global_batch_size // per_pass


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON, generated from the typed config (never hand-edited)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, world),
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, **offload(cfg)},
        # Our AdamW, not DeepSpeed's CPU Adam, also when offloading: the same update everywhere.
        "zero_force_ds_cpu_optimizer": False,
        # On GPUs bf16 is native; on CPUs the weights stay fp32 and the forward pass runs under autocast.
        "bf16": {"enabled": uses_bf16(cfg) and cfg.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def offload(cfg: TrainConfig) -> dict:
    if not cfg.offload_optimizer:
        return {}
    return {"offload_optimizer": {"device": "cpu", "pin_memory": cfg.use_gpu}}


def bf16_autocast_available() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_bf16(cfg: TrainConfig) -> bool:
    """bf16 as set; `auto` is resolved by pipelines.run before planning (tasks/precision.py), and where a
    task is called directly it means bf16 where it is native (a GPU, or a CPU with bf16 instructions)."""
    if cfg.precision == "auto":
        return cfg.use_gpu or bf16_autocast_available()
    return cfg.precision == "bf16"


def autocast(cfg: TrainConfig):
    if uses_bf16(cfg) and not cfg.use_gpu and bf16_autocast_available():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


class AdamW(torch.optim.AdamW):
    """torch's AdamW with the `overflow` flag that DeepSpeed reads after a step: a flagged step
    leaves parameters, optimizer state and schedule as they are, as ZeRO stages 1-3 do for a
    non-finite gradient by themselves."""

    overflow = False

    def step(self, closure=None):
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False):
    """AdamW (no decay on norms and biases) and the warm-up/cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer_class = AdamW if cfg.zero_stage == 0 else torch.optim.AdamW  # ZeRO has its own skip
    optimizer = optimizer_class([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), fused=fused or None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


class Recompute(torch.nn.Module):
    """Runs `inner` under activation checkpointing. The recomputation goes through the module's
    own call, so DeepSpeed's ZeRO-3 hooks gather its weights again."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def recompute_mlps(model: torch.nn.Module) -> None:
    """Selective activation checkpointing: the MLP of every decoder layer (most of the activation
    memory). Attention is left alone, so a KV cache that carries trained state (prefix tuning)
    is used once per step, which Hugging Face's whole-layer checkpointing cannot do."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]
    if not layers:
        raise UserError("activation_checkpointing: the model has no decoder layers with an 'mlp' module")
    for layer in layers:
        if not isinstance(layer.mlp, Recompute):
            layer.mlp = Recompute(layer.mlp)


def init_engine(model: torch.nn.Module, cfg: TrainConfig, world: int, recompute: str = "layers"):
    """DeepSpeed engine over build_optimizer's AdamW and schedule. With activation checkpointing,
    `recompute` says what is recomputed: whole decoder layers ('layers') or their MLPs ('mlp')."""
    deepspeed = import_deepspeed()
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce that only its inference
    # all-reduce uses. Training never calls it, and a process killed while compiling it leaves
    # torch's build lock behind, on which every later run waits forever: it is not built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if cfg.activation_checkpointing and recompute == "layers":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.activation_checkpointing:
        recompute_mlps(model)

    optimizer, scheduler = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world)
    )
    if cfg.compile:
        engine.compile()
    return engine


def to_device(batch: dict, engine) -> dict:
    """Tensors of a batch on the engine's device (CPU tensors stay where they are)."""
    return {k: v.to(engine.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sample_rows(step: int, micro: int, rank: int, world: int, cfg: TrainConfig, num_rows: int) -> np.ndarray:
    """Rows of one micro-batch. The global sample index depends only on (step, position in the
    global batch), so the data order is the same for any number of workers; each epoch is a
    fresh seeded permutation."""
    first = (step * cfg.global_batch_size + micro * cfg.micro_batch_size * world + rank * cfg.micro_batch_size)
    rows = []
    for index in range(first, first + cfg.micro_batch_size):
        epoch, position = divmod(index, num_rows)
        rows.append(_permutation(cfg.seed, epoch, num_rows)[position])
    return np.asarray(rows)


_PERMUTATIONS: dict = {}


def _permutation(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    key = (seed, epoch, num_rows)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return _PERMUTATIONS[key]


def eval_row_slices(num_rows: int, cfg: TrainConfig, rank: int, world: int) -> list[np.ndarray]:
    """This rank's share of the first eval_batches x micro_batch_size validation rows, in micro-batches.
    Every rank gets the same number of batches (ZeRO-3 forward passes are collective)."""
    total = min(cfg.eval_batches * cfg.micro_batch_size, num_rows) // world * world
    mine = np.arange(rank, total, world)
    return [mine[i : i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]


def measure_peak_flops(cfg: TrainConfig, size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a square matrix multiply in the training precision on this worker's threads:
    the denominator of model FLOP utilisation when no peak is declared."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    device = "cuda" if cfg.use_gpu else "cpu"
    dtype = torch.bfloat16 if uses_bf16(cfg) and (cfg.use_gpu or bf16_autocast_available()) else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if cfg.use_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.matmul(a, b)
        if cfg.use_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def train(engine, cfg: TrainConfig, forward: Callable, train_batch: Callable, eval_batches: list,
          log: TrainLog, checkpoint_dir: Path, keeper=None, validate: Callable[[], dict] | None = None) -> dict:
    """One flat loop. `forward(batch) -> mean loss`; `train_batch(step, micro) -> batch`;
    `eval_batches`: this rank's validation batches. Resumes from the newest valid checkpoint in
    checkpoint_dir. A stop request (the context's StopChannel, log.ctx.stop) makes every rank
    checkpoint at the end of the current step and return {"stopped_at_step": step}; a takeover by
    another launch stops every rank at once, without writing (Superseded).
    `keeper` (earlystop.BestKeeper) sees every validation and may end training early; `validate()`
    adds task metrics (e.g. val_accuracy) to each validation's validation loss."""
    accum = engine.gradient_accumulation_steps()
    channel = log.ctx.stop
    state = checkpoints.restore(engine, checkpoint_dir, log)  # window_loss, window_steps, skipped_steps
    start_step = state.pop("step")
    skipped_in_a_row = 0
    engine.train()
    with stop_on_sigterm(channel):
        for step in range(start_step, cfg.max_steps):
            done = step + 1
            step_loss, nonfinite, stop = 0.0, False, False
            for micro in range(accum):
                with autocast(cfg):
                    loss = forward(to_device(train_batch(step, micro), engine))
                value = loss.item()
                flags = all_reduce_sum([0.0 if math.isfinite(value) else 1.0, float(channel.requested()),
                                        float(channel.superseded())])
                nonfinite, stop = nonfinite or flags[0] > 0, stop or flags[1] > 0  # every rank decides alike
                if flags[2] > 0:
                    raise Superseded(f"another launch took over {checkpoint_dir.parent}; this attempt stops "
                                     f"at step {done} without writing")
                if nonfinite and cfg.on_nonfinite == "stop":
                    raise NonFiniteError(f"non-finite training loss at step {done} (try a lower learning rate); "
                                         f"training stopped before applying it")
                engine.backward(loss)
                if cfg.on_nonfinite == "skip" and engine.is_gradient_accumulation_boundary():
                    nonfinite = drop_nonfinite_gradients(engine, nonfinite)
                engine.step()
                step_loss += value / accum

            # --- non-finite loss or gradient: DeepSpeed ZeRO 1-3 leaves such an update out itself ---
            grad_norm = engine.get_global_grad_norm()
            if nonfinite or not engine.was_step_applied() or (grad_norm is not None and not math.isfinite(grad_norm)):
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteError(f"non-finite gradient at step {done} (try a lower learning rate or "
                                         f"grad_clip); its update was not applied")
                state["skipped_steps"] += 1
                skipped_in_a_row += 1
                if log.rank == 0:
                    log.ctx.say(f"step {done}: non-finite loss or gradient, update skipped ({skipped_in_a_row} in a row)")
                if skipped_in_a_row >= cfg.max_skipped_steps:
                    raise NonFiniteError(f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                                         f"(max_skipped_steps); training stopped at step {done}")
            else:
                skipped_in_a_row = 0
                state["window_loss"] += step_loss
                state["window_steps"] += 1

            log_now = done % cfg.log_every == 0 or done == cfg.max_steps
            eval_now = done % cfg.eval_every == 0 or done == cfg.max_steps
            early_stop = False
            if log_now or eval_now:
                metrics = record_metrics(engine, cfg, forward, eval_batches, log, state, done, eval_now, validate)
                # --- early stopping: the keeper saves the best weights and says when to stop ---
                early_stop = eval_now and keeper is not None and keeper.update(engine, done, metrics, state)

            # --- checkpoint: everything needed to continue exactly from here ---
            periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            if done < cfg.max_steps and (periodic or stop):
                started = time.monotonic()
                save_checkpoint(engine, checkpoint_dir, done, cfg.keep_checkpoints, log.rank, state, log.ctx.mirror)
                log.exclude(time.monotonic() - started)
            if stop and done < cfg.max_steps:
                if log.rank == 0:
                    log.ctx.say(f"stop requested: checkpoint written at step {done}/{cfg.max_steps}")
                return {"stopped_at_step": done}
            if early_stop:
                break
    summary = keeper.summary(state, done) if keeper is not None else {}
    return {**log_final(log), "skipped_steps": state["skipped_steps"], **summary}


def record_metrics(engine, cfg: TrainConfig, forward: Callable, eval_batches: list, log: TrainLog, state: dict,
                   done: int, eval_now: bool, validate: Callable[[], dict] | None = None) -> dict:
    """Training loss averaged over ranks and the applied steps since the last record; validation."""
    total, count = all_reduce_sum([state["window_loss"], state["window_steps"]])
    metrics = {"loss": total / count} if count else {}
    metrics["lr"] = engine.get_lr()[0]
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None and math.isfinite(grad_norm):
        metrics["grad_norm"] = float(grad_norm)
    if state["skipped_steps"]:
        metrics["skipped_steps"] = state["skipped_steps"]
    state["window_loss"], state["window_steps"] = 0.0, 0
    if eval_now:
        started = time.monotonic()
        metrics["val_loss"] = evaluate_loss(engine, cfg, forward, eval_batches)
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50))
        if validate is not None:
            metrics.update(validate())
        log.exclude(time.monotonic() - started)
    log.record(done, metrics)
    return metrics


def drop_nonfinite_gradients(engine, nonfinite: bool) -> bool:
    """Without ZeRO, DeepSpeed applies whatever gradient it has: flag a non-finite one so that
    the optimizer leaves the step out (see AdamW). Returns whether the step is non-finite."""
    if engine.zero_optimization_stage() != 0:
        return nonfinite
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    local = nonfinite or not all(torch.isfinite(g).all() for g in grads)
    nonfinite = all_reduce_sum([float(local)])[0] > 0
    engine.optimizer.overflow = nonfinite
    return nonfinite


@contextlib.contextmanager
def stop_on_sigterm(channel: StopChannel):
    """Where training runs in a process's main thread, SIGTERM requests a checkpoint and a clean
    stop (under Ray Train the driver's stop request comes through the channel instead)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: channel.request())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def save_checkpoint(engine, checkpoint_dir: Path, step: int, keep: int, rank: int, state: dict,
                    mirror: Mirror) -> None:
    """Never a checkpoint with non-finite weights. The data position is the step (the order is a
    function of it); the loss window and skip count travel along, so logged losses resume exactly."""
    local = [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in engine.module.parameters()]
    if all_reduce_sum([float(sum(not torch.isfinite(t).all() for t in local))])[0]:
        raise NonFiniteError(f"non-finite weights after step {step}; no checkpoint was written")
    _, world = rank_and_world()
    checkpoints.save(engine, checkpoint_dir, step, keep, rank, world,
                     {**state, "torch_rng": torch.get_rng_state()}, mirror)


def evaluate_loss(engine, cfg: TrainConfig, forward: Callable, eval_batches: list) -> float:
    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches:
            with autocast(cfg):
                loss = forward(to_device(batch, engine))
            weight = batch["weight"]
            total += loss.item() * weight
            count += weight
    engine.train()
    total, count = all_reduce_sum([total, count])
    return total / max(count, 1)


@dataclass
class Job:
    """What a training step's worker sets up (its engine, data and log) for `run_worker`."""

    engine: object
    cfg: TrainConfig
    forward: Callable
    train_batch: Callable
    eval_batches: list
    log: TrainLog
    export: Callable[[dict], dict]
    """export(training metrics) -> the step's metrics, once training finished: rank 0 writes the
    step's results; every rank calls it (ZeRO-3 gathers the weights collectively)."""
    keeper: BestKeeper | None = None
    validate: Callable[[], dict] | None = None


def run_worker(cfg: TrainConfig, out_dir: Path, ctx: TaskContext, prepare: Callable[[int, int], Job]) -> dict:
    """A training step's worker, the same for every training step: set up, `prepare(rank, world)`,
    train (resuming from out_dir's checkpoints), and unless a stop request ended training (the
    checkpoint then stays for the next run) export and drop the checkpoints."""
    setup_worker(cfg)
    rank, world = rank_and_world()
    job = prepare(rank, world)
    checkpoint_dir = out_dir / CHECKPOINTS
    metrics = train(job.engine, job.cfg, job.forward, job.train_batch, job.eval_batches, job.log, checkpoint_dir,
                    job.keeper, job.validate)
    if "stopped_at_step" in metrics:
        return metrics
    metrics = job.export(metrics)
    checkpoints.remove(checkpoint_dir, rank, ctx.mirror)
    return metrics
