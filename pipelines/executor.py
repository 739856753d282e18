"""Runs the planned steps on Ray: data steps as Ray tasks (which fan out with `parallel_map`),
training steps as Ray Train `TorchTrainer` jobs (gloo on CPU, NCCL on GPU). Cached steps
are skipped. The only module that knows Ray; where results live and how they move (a shared
root, a step store, an object store) is pipelines/storage.py's, one code path here per step kind.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from conf.schema import Config
from pipelines import artifacts
from pipelines.dag import PlannedStep, datasets_read
from pipelines.redaction import redact, redact_text
from pipelines.stopping import STOP, DiskFull, Preempted, fit_off_main_thread, out_of_space
from pipelines.storage import Attempt, Storage
from pipelines.tracking import Tracker, error_line
from tasks.common import Progress, TaskContext, UserError

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
def start_ray(cfg: Config) -> dict:
    """Join `ray.address` / $RAY_ADDRESS, or start an embedded local Ray. Returns cluster resources."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        loopback_only()
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(log_to_driver=True, logging_level=logging.WARNING, runtime_env={"env_vars": WORKER_ENV},
                  logging_config=ray.LoggingConfig(log_level="ERROR"))
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    return ray.cluster_resources()


def loopback_only() -> None:
    """An embedded Ray listens on loopback only (GCS, raylet, workers, dashboard and runtime-env agents),
    so nothing of it is reachable from other machines. Ray turns a node address of 127.0.0.1 into the
    machine's external one unless it is told the node is no cluster member (the switch that Ray names for
    Windows and macOS, read when Ray is imported; set on the module too if it already was)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def autoscaler_ceiling() -> dict | None:
    """The most the cluster's node groups add up to where an autoscaler may add nodes (KubeRay,
    `ray up`); None without one (an embedded Ray, a fixed cluster)."""
    import ray._private.state  # private API: the cluster config the autoscaler publishes (Ray Data reads it so too)

    return ray._private.state.state.get_max_resources_from_cluster_config() or None


def check_resources(planned: list[PlannedStep], resources: dict, ceiling: dict | None = None) -> None:
    """A training job that asks for more than the cluster has, or than its autoscaler can add,
    would wait forever: say so now. One the autoscaler must grow the cluster for is announced."""
    for item in planned:
        if item.status != "run" or item.step.train is None:
            continue
        train = item.step.train(item.section)
        need = {"CPU": train.num_workers * train.cpus_per_worker, "GPU": train.num_workers if train.use_gpu else 0}
        for kind, amount in need.items():
            have, most = resources.get(kind, 0), max(resources.get(kind, 0), (ceiling or {}).get(kind, 0))
            if amount > most:
                grown = f" and its autoscaler can grow it to {most:g}" if ceiling else ""
                raise UserError(f"{item.step.name}.num_workers x cpus_per_worker needs {amount:g} {kind}, "
                                f"the Ray cluster has {have:g}{grown}")
            if amount > have:
                print(f"{item.step.name} needs {amount:g} {kind}, the Ray cluster has {have:g} now: its autoscaler "
                      f"adds nodes when the step starts (up to {most:g})", flush=True)


WAIT_S = 0.5  # ray_map hands over finished results at least this often


def ray_map(fn, items: list, ctx: TaskContext | None = None, on_result=None, node_id: str | None = None) -> list:
    """Run fn over items as parallel Ray tasks; results in input order. on_result(index, result) is
    called here as each task finishes (the caller then shows progress); without it, a generic progress line.
    node_id: all on that node (where the step's inputs and work directory are, without a shared root)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    apply = ray.remote(num_cpus=1)(_apply)
    if node_id:
        apply = apply.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
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


def _run_data_task(step, section, attempt: Attempt, log_metrics, cluster_cpus: int) -> dict:
    """A data step on whichever node Ray picked: its inputs there, the step run, its result published."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    say = TaskContext(step.name).say
    with attempt.data(section, say) as place:
        pin = node_id if place.pinned else None  # the step's directories are on this node alone
        num_cpus = node_cpus(pin) if pin else cluster_cpus
        ctx = TaskContext(step.name, log_metrics=log_metrics, num_cpus=max(num_cpus, 1), work_dir=place.work_dir,
                          mirror=place.mirror)  # finished work units
        ctx.parallel_map = lambda fn, items, on_result=None: ray_map(fn, items, ctx, on_result, pin)
        metrics = step.fn(place.section, place.inputs, place.staging, ctx)
        return attempt.publish(place, metrics, [node_id])


def node_cpus(node_id: str) -> int:
    import ray

    return next(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["NodeID"] == node_id)


def run_data_step(item: PlannedStep, attempt: Attempt, log_metrics, resources: dict) -> dict:
    """The step's manifest, once a Ray task has run and published it."""
    import ray

    task = ray.remote(num_cpus=1)(_run_data_task)
    cluster_cpus = max(int(resources.get("CPU", 1)), 1)
    return ray.get(task.remote(item.step, item.section, attempt, log_metrics, cluster_cpus))


def run_training_step(item: PlannedStep, attempt: Attempt, log_metrics, root: Path) -> dict:
    """The step's manifest, once a Ray Train job has trained it; its rank 0 reports the outcome (and
    where the nodes share no directory publishes it). `root`: where Ray Train keeps its runs."""
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = item.step.train(item.section)
    step, section = item.step, item.section

    def loop_per_worker(_config):
        if not train.use_gpu:  # DeepSpeed would otherwise probe for accelerators and warn about it
            os.environ["DS_ACCELERATOR"] = "cpu"
        rank = ray.train.get_context().get_world_rank()
        ctx = TaskContext(step.name, log_metrics=log_metrics if rank == 0 else _ignore, num_cpus=train.cpus_per_worker)
        with attempt.training(rank, ctx.say) as (place, stop):
            ctx.mirror, ctx.stop = place.mirror, stop
            metrics = step.fn(section, place.inputs, place.work_dir, ctx)
        if rank == 0:
            attempt.report(place, metrics, ray.get_runtime_context().get_node_id())

    trainer = TorchTrainer(
        loop_per_worker,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=RunConfig(name=artifacts.train_run_name(step.name, item.fingerprint),
                             storage_path=str((root / artifacts.TRAIN_RUNS).resolve()),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             logging_config=ray.LoggingConfig(log_level="WARNING")),
    )
    reported = attempt.fit(lambda request_stop: STOP.while_training(request_stop, lambda: fit_off_main_thread(trainer)))
    metrics = reported["metrics"]
    if "stopped_at_step" in metrics:
        raise Preempted(f"stopped by {STOP.signal_name}: {step.name} checkpointed at step {metrics['stopped_at_step']}; "
                        f"rerun the same command to continue from there", STOP.exit_code)
    manifest = attempt.publish_training(reported)
    artifacts.remove_train_runs(root, step.base, item.fingerprint)  # kept when an attempt fails
    return manifest


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
              "taskdata": "train_records", "decontaminate": "test_contaminated", "finetune": ("final_val_accuracy", "final_val_loss"),
              "evaluate": "finetuned_accuracy", "control": "final_val_accuracy"}
REVIEW_FILES = [artifacts.MANIFEST, "report.json", "quarantine.json", "mixture.json", "train_log.jsonl",
                "samples.jsonl", "dropped_examples.jsonl"]
"""What each step's MLflow run shows of its directory."""


def execute(planned: list[PlannedStep], storage: Storage, tracker: Tracker, resources: dict) -> list[StepResult]:
    """Run or reuse each planned step in order; `storage` says where results are and how they move."""
    results = []
    for index, item in enumerate(planned, start=1):
        name = item.step.name
        run_id = tracker.start_step(name, item.fingerprint, item.status, item.reason, item.view)
        tracker.log_inputs(run_id, datasets_read(item, storage.root))
        started = time.monotonic()
        say = lambda message: print(f"[{index}/{len(planned)}] {name}: {message}", flush=True)
        manifest, ran = run_or_reuse(item, storage, tracker, run_id, resources, say)
        storage.keep(item, manifest, ran, say)
        seconds = time.monotonic() - started
        metrics = manifest.get("metrics", {})
        tracker.log_metrics(run_id, metrics)
        if not ran and manifest.get("mlflow_run_id") not in (None, run_id):
            tracker.set_tags(run_id, {"lmforge.produced_by": manifest["mlflow_run_id"]})  # the run that computed it
        with storage.review(item, manifest, REVIEW_FILES) as shown:
            show_step(tracker, run_id, name, shown)
        results.append(StepResult(name, "ran" if ran else "cached", seconds if ran else manifest.get("seconds", 0.0),
                                  item.fingerprint, storage.location(item), metrics, run_id))
    return results


def run_or_reuse(item: PlannedStep, storage: Storage, tracker: Tracker, run_id: str, resources: dict,
                 say) -> tuple[dict, bool]:
    """The step's manifest, and whether this launch ran it (under the step's lock, unless another
    launch finished it meanwhile)."""
    if item.status == "cached":
        return storage.reuse(item, say), False
    with storage.lock(item, say):
        manifest = storage.finished_meanwhile(item)
        if manifest:
            say(f"cached ({item.fingerprint}), finished by another launch meanwhile")
            return manifest, False
        say(f"running, {item.reason}")
        return run_step(item, storage, resources, tracker, run_id), True


def show_step(tracker: Tracker, run_id: str, name: str, directory: Path) -> None:
    """A step's MLflow run: its manifest, reports, loss curve and sample tables; then it ends."""
    tracker.log_artifacts(run_id, [directory / file for file in REVIEW_FILES[:4]])
    tracker.log_loss_curve(run_id, directory / "train_log.jsonl", f"{name} loss")
    tracker.log_jsonl_table(run_id, directory / "samples.jsonl", "samples.json")
    tracker.log_jsonl_table(run_id, directory / "dropped_examples.jsonl", "dropped_examples.json")
    tracker.end(run_id)


def run_step(item: PlannedStep, storage: Storage, resources: dict, tracker: Tracker, run_id: str) -> dict:
    """Run a step and publish its result; a failure is recorded on its run (a full disk as DiskFull).
    A training step keeps its checkpoints for the next attempt, a data step its finished work units."""
    log_metrics = tracker.metric_logger(run_id)
    base = {
        "step": item.step.base, "version": item.step.version, "fingerprint": item.fingerprint,
        "config": redact(item.view), "upstream": item.upstream, "code_version": artifacts.code_version(),
        "started_at": time.time(), "mlflow_run_id": run_id,
    }
    attempt = storage.attempt(item, base, uuid.uuid4().hex)
    try:
        if item.step.train is not None:
            return run_training_step(item, attempt, log_metrics, storage.root)
        return run_data_step(item, attempt, log_metrics, resources)
    except BaseException as error:
        full = out_of_space(error, storage.disk_of(item))
        record_failure(tracker, run_id, error)
        if full:
            raise DiskFull(f"{item.step.name}: no space left on the device of {storage.root} "
                           f"({type(error).__name__}: {error_line(error)}); free some space and rerun: finished "
                           f"steps are kept, and nothing of {item.step.name} was taken as a result") from error
        raise


def root_error(exc: BaseException) -> BaseException:
    """The original error behind Ray's wrappers (a task's error, a Train worker group's failures)."""
    while True:
        inner = getattr(exc, "cause", None)
        failures = list((getattr(exc, "worker_failures", None) or {}).values())
        if isinstance(inner, BaseException):
            exc = inner
        elif failures:
            exc = failures[0]
        else:
            return exc


def cause_of(exc: BaseException, kinds: tuple[type, ...]) -> BaseException | None:
    """The first error of `kinds` behind exc: Ray's wrappers unwrapped, then its chain of causes."""
    link = root_error(exc)
    while link is not None and not isinstance(link, kinds):
        link = link.__cause__
    return link


def failure_line(exc: BaseException) -> str:
    """What went wrong, in one line with secrets masked: the UserError (bad input or config), full disk or
    stop behind the error if there is one, else the original error's type and first line."""
    told = cause_of(exc, (UserError, DiskFull, Preempted))
    error = root_error(exc)
    return redact_text(str(told) if told else f"{type(error).__name__}: {error_line(error)}")


def record_failure(tracker: Tracker, run_id: str, error: BaseException) -> None:
    """A run (a step's, or the pipeline's parent) ended by an error: its one-line reason as a tag, KILLED
    when a stop signal ended it, else FAILED. Recording must not hide the error (a full disk)."""
    with contextlib.suppress(Exception):
        tracker.set_tags(run_id, {"lmforge.error": failure_line(error)})
        tracker.end(run_id, "KILLED" if isinstance(error, Preempted) else "FAILED")
