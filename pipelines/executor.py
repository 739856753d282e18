"""Runs the planned steps on Ray: data steps as Ray tasks (which fan out with `parallel_map`),
training steps as Ray Train `TorchTrainer` jobs (gloo on CPU, NCCL on GPU). Cached steps
are skipped. The only module that knows Ray.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from conf.schema import Config
from pipelines import artifacts, locks
from pipelines.dag import PlannedStep
from pipelines.redaction import redact, redact_text
from pipelines.tracking import Tracker, error_line
from tasks.common import Progress, TaskContext, UserError, write_json
from tasks.training import OWNER_FILE, STOP_FILE

# Passed to every Ray worker: fewer framework messages between the progress lines.
WORKER_ENV = {
    "PYTHONWARNINGS": "ignore",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else each worker line reaches the driver twice
    # Ray Train's controller polls its workers every 2 s and watches for preemption every 5 s;
    # on a small CPU machine that polling costs training about a tenth of its speed
    # (benchmarks/pretrain_throughput.py). A dead worker is still noticed within 10 s.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "10",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "30",
    # Ray Train's state actor polls the state API at address 'auto', which fails once a second
    # Ray instance runs on the machine (two launches at once); it only feeds the Ray dashboard.
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
}
STOP_GRACE_SECONDS = 300  # after SIGTERM, the longest wait for a training step's checkpoint


LOW_SPACE_BYTES = 1 << 20  # a step that fails with less free space than this is taken to have filled the disk


class DiskFull(Exception):
    """A step failed because its filesystem is full; nothing partial was published."""


def out_of_space(error: BaseException, directory: Path) -> bool:
    """Whether a step's failure comes from a full disk: ENOSPC anywhere in its message (Ray and
    torch re-wrap OSErrors), or (torch reports only 'file write failed') almost no space left."""
    if "No space left on device" in str(error):
        return True
    try:
        return shutil.disk_usage(directory if directory.exists() else directory.parent).free < LOW_SPACE_BYTES
    except OSError:
        return False


class Preempted(Exception):
    """SIGTERM stopped the run; finished steps and the running training step's checkpoint are kept."""


class StopRequest:
    """SIGTERM handling for the driver. During a training step it asks the workers (through a
    file in the step's directory) to checkpoint at the end of their current step and return;
    otherwise it stops at once. A second SIGTERM, or no checkpoint within STOP_GRACE_SECONDS,
    ends the process."""

    def __init__(self):
        self.requested = False
        self.training_dir: Path | None = None

    def __enter__(self):
        import signal

        self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGTERM, self.previous)

    def handle(self, *_):
        import sys
        import threading

        if self.requested or self.training_dir is None:
            if self.requested:
                print("second SIGTERM: stopping now", file=sys.stderr, flush=True)
                os._exit(143)
            self.requested = True
            raise Preempted("stopped by SIGTERM; finished steps are kept")
        self.requested = True
        print("SIGTERM: the training step checkpoints at the end of its current step, then the run stops",
              file=sys.stderr, flush=True)
        (self.training_dir / STOP_FILE).touch()
        timer = threading.Timer(STOP_GRACE_SECONDS, lambda: (print(
            f"no checkpoint within {STOP_GRACE_SECONDS} s of SIGTERM: stopping now", file=sys.stderr, flush=True),
            os._exit(143)))
        timer.daemon = True
        timer.start()


STOP = StopRequest()


def start_ray(cfg: Config) -> dict:
    """Join `ray.address` / $RAY_ADDRESS, or start an embedded local Ray. Returns cluster resources."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(log_to_driver=True, logging_level=logging.WARNING, runtime_env={"env_vars": WORKER_ENV},
                  logging_config=ray.LoggingConfig(log_level="ERROR"))
    if address:
        ray.init(address=address, **kwargs)
    else:
        # An embedded Ray stays on loopback: nothing of it is reachable from other machines.
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    return ray.cluster_resources()


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def check_resources(planned: list[PlannedStep], resources: dict) -> None:
    """A training job that asks for more than the cluster has would wait forever: say so now."""
    for item in planned:
        if item.status != "run" or item.step.train is None:
            continue
        train = item.step.train(item.section)
        need = {"CPU": train.num_workers * train.cpus_per_worker, "GPU": train.num_workers if train.use_gpu else 0}
        for kind, amount in need.items():
            if amount > resources.get(kind, 0):
                raise UserError(f"{item.step.name}.num_workers x cpus_per_worker needs {amount:g} {kind}, "
                                f"the Ray cluster has {resources.get(kind, 0):g}")


WAIT_S = 0.5  # ray_map hands over finished results at least this often


def ray_map(fn, items: list, ctx: TaskContext | None = None, on_result=None) -> list:
    """Run fn over items as parallel Ray tasks; results in input order. on_result(index, result) is
    called here as each task finishes (the caller then shows progress); without it, a generic progress line."""
    import ray

    apply = ray.remote(num_cpus=1)(_apply)
    fn_ref = ray.put(fn)  # serialised once, not once per task (it may hold a tokenizer)
    futures = [apply.remote(fn_ref, item) for item in items]
    index = {ref: i for i, ref in enumerate(futures)}
    progress = Progress(ctx, len(futures), "parallel tasks") if ctx and on_result is None else None
    results, pending = [None] * len(futures), list(futures)
    while pending:  # all that finished within WAIT_S: one wait per task is quadratic in thousands of tasks
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_S)
        for ref in done:
            results[index[ref]] = ray.get(ref)
            if on_result:
                on_result(index[ref], results[index[ref]])
        if progress:
            progress.update(len(done))
    return results


def _apply(fn, item):
    return fn(item)


def _run_task(step, section, inputs: dict, out_dir: str, log_metrics, num_cpus: int,
              work_dir: str) -> tuple[dict, str]:
    import ray

    ctx = TaskContext(step.name, log_metrics=log_metrics, num_cpus=num_cpus, work_dir=Path(work_dir))
    ctx.parallel_map = lambda fn, items, on_result=None: ray_map(fn, items, ctx, on_result)
    return step.fn(section, inputs, Path(out_dir), ctx), ray.get_runtime_context().get_node_id()


def run_data_step(item: PlannedStep, inputs: dict, out_dir: Path, log_metrics, resources: dict,
                  work_dir: Path) -> tuple[dict, list]:
    """The step's metrics, and the Ray node it ran on. work_dir outlives a failed attempt (finished work units)."""
    import ray

    task = ray.remote(num_cpus=1)(_run_task)
    num_cpus = max(int(resources.get("CPU", 1)), 1)
    metrics, node_id = ray.get(task.remote(item.step, item.section, inputs, str(out_dir), log_metrics, num_cpus,
                                           str(work_dir)))
    return metrics, [node_id]


def run_training_step(item: PlannedStep, inputs: dict, out_dir: Path, log_metrics, root: Path) -> tuple[dict, list]:
    """The step's metrics, and the Ray node of rank 0."""
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = item.step.train(item.section)
    step, section = item.step, item.section
    token = uuid.uuid4().hex

    def loop_per_worker(_config):
        if not train.use_gpu:  # DeepSpeed would otherwise probe for accelerators and warn about it
            os.environ["DS_ACCELERATOR"] = "cpu"
        rank = ray.train.get_context().get_world_rank()
        ctx = TaskContext(step.name, log_metrics=log_metrics if rank == 0 else _ignore, num_cpus=train.cpus_per_worker)
        metrics = step.fn(section, inputs, out_dir, ctx)
        # Ray Train keeps reported metrics only with checkpoints: hand them over as a file, unless
        # another launch has taken the step over since (this attempt's driver was killed).
        if rank == 0 and (out_dir / OWNER_FILE).read_text() == token:
            node_id = ray.get_runtime_context().get_node_id()
            write_json(out_dir / artifacts.TRAIN_METRICS, {"metrics": metrics, "node_id": node_id})

    trainer = TorchTrainer(
        loop_per_worker,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=RunConfig(name=f"{step.name}-{item.fingerprint}-{uuid.uuid4().hex[:6]}",
                             storage_path=str((root / ".ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             logging_config=ray.LoggingConfig(log_level="WARNING")),
    )
    metrics_path = out_dir / artifacts.TRAIN_METRICS
    reported = artifacts.finished_training(out_dir)  # its driver was killed after training, before publishing
    if reported is None:
        (out_dir / STOP_FILE).unlink(missing_ok=True)  # a request of an earlier, stopped attempt
        # Workers of an attempt whose driver was killed may still run for a few seconds: the
        # owner file tells them they were replaced (tasks/training.py), so they stop writing.
        (out_dir / OWNER_FILE).write_text(token)
        STOP.training_dir = out_dir
        try:
            trainer.fit()
        finally:
            STOP.training_dir = None
        (out_dir / STOP_FILE).unlink(missing_ok=True)
        reported = json.loads(metrics_path.read_text())
    (out_dir / OWNER_FILE).unlink(missing_ok=True)
    metrics = reported["metrics"]
    metrics_path.unlink()
    if "stopped_at_step" in metrics:
        raise Preempted(f"stopped by SIGTERM: {step.name} checkpointed at step {metrics['stopped_at_step']}; "
                        f"rerun the same command to continue from there")
    return metrics, [reported["node_id"]]


def _ignore(*_args, **_kwargs) -> None:
    return None


@dataclass
class StepResult:
    name: str
    status: str
    seconds: float
    fingerprint: str
    out_dir: str
    metrics: dict = field(default_factory=dict)
    run_id: str = ""


KEY_METRIC = {"ingest": "docs_kept", "tokenize": "train_tokens", "pretrain": "final_val_ppl",
              "taskdata": "train_records", "decontaminate": "test_contaminated", "finetune": "final_val_loss",
              "evaluate": "finetuned_accuracy"}


def execute(planned: list[PlannedStep], root: Path, tracker: Tracker, resources: dict, store=None) -> list[StepResult]:
    """Run or reuse each planned step in order; with a step store, download the steps cached only
    there and upload every result it lacks."""
    results = []
    for index, item in enumerate(planned, start=1):
        name = item.step.name
        inputs = {dep: root / dep / fp for dep, fp in item.upstream.items()}
        run_id = tracker.start_step(name, item.fingerprint, item.status, item.reason, item.view)
        started = time.monotonic()
        say = lambda message: print(f"[{index}/{len(planned)}] {name}: {message}", flush=True)
        ran = False
        if item.in_store:
            with locks.step_lock(locks.lock_path(root, item.step.base, item.fingerprint), say):
                manifest = store.pull(item.step.base, item.fingerprint, root)
            say(f"cached ({item.fingerprint}), downloaded from the step store")
        elif item.status == "cached":
            manifest = artifacts.read_manifest(item.out_dir)
            say(f"cached ({item.fingerprint})")
        else:
            with locks.step_lock(locks.lock_path(root, item.step.base, item.fingerprint), say):
                manifest = artifacts.read_manifest(item.out_dir)
                if manifest and not artifacts.damage(item.out_dir, manifest):
                    say(f"cached ({item.fingerprint}), finished by another launch meanwhile")
                else:
                    say(f"running, {item.reason}")
                    manifest, ran = run_step(item, inputs, root, resources, tracker, run_id), True
        if store is not None and not item.in_store and store.push(item.out_dir, manifest):
            say(f"uploaded to the step store {redact_text(store.uri)}")
        seconds = time.monotonic() - started
        metrics = manifest.get("metrics", {})
        tracker.log_metrics(run_id, metrics)
        tracker.log_artifacts(run_id, [item.out_dir / artifacts.MANIFEST, item.out_dir / "report.json",
                                       item.out_dir / "quarantine.json", item.out_dir / "mixture.json"])
        tracker.log_loss_curve(run_id, item.out_dir / "train_log.jsonl", f"{name} loss")
        tracker.log_jsonl_table(run_id, item.out_dir / "samples.jsonl", "samples.json")
        tracker.log_jsonl_table(run_id, item.out_dir / "dropped_examples.jsonl", "dropped_examples.json")
        tracker.end(run_id)
        results.append(StepResult(name, "ran" if ran else "cached", seconds if ran else manifest.get("seconds", 0.0),
                                  item.fingerprint, str(item.out_dir), metrics, run_id))
    return results


def run_step(item: PlannedStep, inputs: dict, root: Path, resources: dict, tracker: Tracker, run_id: str) -> dict:
    log_metrics = tracker.metric_logger(run_id)
    training = item.step.train is not None
    work_dir = artifacts.partial_dir(root, item.step.base, item.fingerprint)  # kept when an attempt fails
    if training:
        staging = work_dir
        staging.mkdir(parents=True, exist_ok=True)
    else:
        staging = artifacts.staging_dir(root, item.step.base, item.fingerprint)
    started, started_wall = time.monotonic(), time.time()
    try:
        if training:
            metrics, node_ids = run_training_step(item, inputs, staging, log_metrics, root)
        else:
            metrics, node_ids = run_data_step(item, inputs, staging, log_metrics, resources, work_dir)
    except BaseException as error:
        full = out_of_space(error, staging)
        if not training:  # a training step keeps its checkpoints for the next attempt
            shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(Exception):  # recording the failure must not hide it (a full disk)
            tracker.end(run_id, "KILLED" if isinstance(error, Preempted) else "FAILED")
        if full:
            raise DiskFull(f"{item.step.name}: no space left on the device of {staging.parent.parent} "
                           f"({type(error).__name__}: {error_line(error)}); free some space and rerun: finished "
                           f"steps are kept, and nothing of {item.step.name} was taken as a result") from error
        raise
    manifest = {
        "step": item.step.base, "version": item.step.version, "fingerprint": item.fingerprint,
        "config": redact(item.view), "upstream": item.upstream, "inputs": inputs, "metrics": metrics,
        "code_version": artifacts.code_version(), "started_at": started_wall, "finished_at": time.time(),
        "seconds": time.monotonic() - started, "mlflow_run_id": run_id,
        "placement": {"node_ids": node_ids},  # where it ran (Ray node ids); not part of the result
    }
    manifest = artifacts.publish(staging, item.out_dir, manifest)
    shutil.rmtree(work_dir, ignore_errors=True)  # a data step's finished work units (a training step's moved)
    return manifest
