"""Runs the planned steps on Ray: data steps as Ray tasks (which fan out with `parallel_map`),
training steps as Ray Train `TorchTrainer` jobs (gloo on CPU, NCCL on GPU). Cached steps
are skipped. The only module that knows Ray.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from conf.schema import Config
from pipelines import artifacts, locks
from pipelines.stopping import STOP, DiskFull, Preempted, fit_here, fit_on_nodes, out_of_space, watch_stop_request
from pipelines import store as store_module
from pipelines.dag import PlannedStep, datasets_read
from pipelines.redaction import redact, redact_text
from pipelines.tracking import Tracker, error_line
from tasks.common import Progress, TaskContext, UserError, write_atomic, write_json
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


@dataclass(frozen=True)
class NodeRoots:
    """paths.root is a URI: the nodes share only that store, and each works in its own copy
    (store.cache_root: paths.cache, or $LMFORGE_CACHE on the node)."""
    store_uri: str
    cache: str
    driver_root: Path

    def here(self):
        """This node's working copy and the store."""
        return store_module.cache_root(self.cache), store_module.root_store(self.store_uri)


def _run_task_on_node(step, section, upstream: dict, base: dict, log_metrics, nodes: NodeRoots) -> dict:
    """A data step on whichever node Ray picked: fetch its inputs there, run it, publish it to the store."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    root, store = nodes.here()
    say = TaskContext(step.name).say
    inputs = store_module.fetch_steps(store, root, upstream, say)
    section = store_module.relocate(section, nodes.driver_root, root, store, say)
    fingerprint = base["fingerprint"]
    num_cpus = next(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["NodeID"] == node_id)
    with locks.step_lock(locks.lock_path(root, step.base, fingerprint, "node"), say):
        staging = artifacts.staging_dir(root, step.base, fingerprint)
        work_dir = artifacts.partial_dir(root, step.base, fingerprint)
        ctx = TaskContext(step.name, log_metrics=log_metrics, num_cpus=max(num_cpus, 1), work_dir=work_dir,
                          mirror=store_module.NodeMirror(nodes.store_uri, str(root)))  # finished work units
        ctx.parallel_map = lambda fn, items, on_result=None: ray_map(fn, items, ctx, on_result, node_id)
        try:
            metrics = step.fn(section, inputs, staging, ctx)
            manifest = store_module.publish(staging, root, store, finished(base, inputs, metrics, [node_id]))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        store.delete_dir(f"{step.base}/{work_dir.name}")
    return manifest


def finished(base: dict, inputs: dict, metrics: dict, node_ids: list) -> dict:
    """A step's manifest (before sealing) once it has finished."""
    return {**base, "inputs": inputs, "metrics": metrics, "finished_at": time.time(),
            "seconds": time.time() - base["started_at"],
            "placement": {"node_ids": node_ids}}  # where it ran (Ray node ids); not part of the result


def run_training_step(item: PlannedStep, inputs: dict, out_dir: Path, log_metrics, root: Path,
                      nodes: NodeRoots | None = None, base: dict | None = None) -> tuple[dict, list]:
    """The step's metrics, and the Ray node of rank 0. With `nodes` (no shared root) each node
    trains in its own copy and rank 0 publishes the result to the store (`base`: its manifest so far)."""
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = item.step.train(item.section)
    step, section, fingerprint = item.step, item.section, item.fingerprint
    token = uuid.uuid4().hex
    store = nodes.here()[1] if nodes else None
    outcome_name, stop_name = (f"{step.base}/.partial-{fingerprint}/{name}" for name in (artifacts.TRAIN_METRICS, STOP_FILE))

    def loop_per_worker(_config):
        if not train.use_gpu:  # DeepSpeed would otherwise probe for accelerators and warn about it
            os.environ["DS_ACCELERATOR"] = "cpu"
        rank = ray.train.get_context().get_world_rank()
        node_id = ray.get_runtime_context().get_node_id()
        ctx = TaskContext(step.name, log_metrics=log_metrics if rank == 0 else _ignore, num_cpus=train.cpus_per_worker)
        here, local_inputs, work_dir = root, inputs, out_dir
        if nodes:
            here, node_store = nodes.here()
            local_inputs = store_module.fetch_steps(node_store, here, item.upstream, ctx.say)
            work_dir = artifacts.partial_dir(here, step.base, fingerprint)
            work_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(work_dir / OWNER_FILE, lambda fh: fh.write(token.encode()))  # fences this node's old workers
            ctx.mirror = store_module.NodeMirror(nodes.store_uri, str(here))  # checkpoints through the store
        end_watch = watch_stop_request(node_store, stop_name, work_dir / STOP_FILE) if nodes and rank == 0 else _ignore
        try:
            metrics = step.fn(section, local_inputs, work_dir, ctx)
        finally:
            end_watch()
        # Ray Train keeps reported metrics only with checkpoints: hand them over as a file, unless
        # another launch has taken the step over since (this attempt's driver was killed).
        if rank == 0 and (work_dir / OWNER_FILE).read_text() == token:
            if nodes and "stopped_at_step" not in metrics:
                for leftover in (OWNER_FILE, STOP_FILE):
                    (work_dir / leftover).unlink(missing_ok=True)
                store_module.publish(work_dir, here, node_store, finished(base, local_inputs, metrics, [node_id]))
            if nodes:
                node_store.put_json(outcome_name, {"metrics": metrics, "node_id": node_id})
            else:
                write_json(out_dir / artifacts.TRAIN_METRICS, {"metrics": metrics, "node_id": node_id})

    trainer = TorchTrainer(
        loop_per_worker,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=RunConfig(name=artifacts.train_run_name(step.name, fingerprint),
                             storage_path=str((root / artifacts.TRAIN_RUNS).resolve()),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             logging_config=ray.LoggingConfig(log_level="WARNING")),
    )
    if nodes:
        reported = fit_on_nodes(trainer, store, stop_name, outcome_name)
    else:
        reported = fit_here(trainer, out_dir, token)
    metrics = reported["metrics"]
    if "stopped_at_step" in metrics:
        raise Preempted(f"stopped by {STOP.signal_name}: {step.name} checkpointed at step {metrics['stopped_at_step']}; "
                        f"rerun the same command to continue from there", STOP.exit_code)
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
              "taskdata": "train_records", "decontaminate": "test_contaminated", "finetune": ("final_val_accuracy", "final_val_loss"),
              "evaluate": "finetuned_accuracy", "control": "final_val_accuracy"}
REVIEW_FILES = [artifacts.MANIFEST, "report.json", "quarantine.json", "mixture.json", "train_log.jsonl",
                "samples.jsonl", "dropped_examples.jsonl"]
"""What each step's MLflow run shows of its directory."""


def execute(planned: list[PlannedStep], root: Path, tracker: Tracker, resources: dict, store=None,
            nodes: NodeRoots | None = None) -> list[StepResult]:
    """Run or reuse each planned step in order; with a step store, download the steps cached only
    there and upload every result it lacks. With `nodes` the store is the root: steps run and
    publish on their nodes, and nothing is downloaded here but what MLflow shows."""
    results = []
    for index, item in enumerate(planned, start=1):
        name = item.step.name
        inputs = {dep: root / dep / fp for dep, fp in item.upstream.items()}
        run_id = tracker.start_step(name, item.fingerprint, item.status, item.reason, item.view)
        tracker.log_inputs(run_id, datasets_read(item, root))
        started = time.monotonic()
        say = lambda message: print(f"[{index}/{len(planned)}] {name}: {message}", flush=True)
        ran = False
        if item.in_store and nodes:
            manifest = store.manifest(item.step.base, item.fingerprint)
            say(f"cached ({item.fingerprint}) in {redact_text(store.uri)}")
        elif item.in_store:
            with locks.step_lock(locks.lock_path(root, item.step.base, item.fingerprint), say):
                manifest = store.pull(item.step.base, item.fingerprint, root)
            say(f"cached ({item.fingerprint}), downloaded from the step store")
        elif item.status == "cached":
            manifest = artifacts.read_manifest(item.out_dir)
            say(f"cached ({item.fingerprint})")
        else:
            with locks.step_lock(locks.lock_path(root, item.step.base, item.fingerprint), say):
                manifest = (store.manifest(item.step.base, item.fingerprint) if nodes
                            else artifacts.read_manifest(item.out_dir))
                if manifest and (nodes or not artifacts.damage(item.out_dir, manifest)):
                    say(f"cached ({item.fingerprint}), finished by another launch meanwhile")
                else:
                    say(f"running, {item.reason}")
                    manifest, ran = run_step(item, inputs, root, resources, tracker, run_id, nodes), True
        published_on_node = nodes and ran  # uploaded by the node that ran it
        if store is not None and not item.in_store and not published_on_node and store.push(item.out_dir, manifest):
            say(f"uploaded to the step store {redact_text(store.uri)}")
        seconds = time.monotonic() - started
        metrics = manifest.get("metrics", {})
        tracker.log_metrics(run_id, metrics)
        if not ran and manifest.get("mlflow_run_id") not in (None, run_id):
            tracker.set_tags(run_id, {"lmforge.produced_by": manifest["mlflow_run_id"]})  # the run that computed it
        with tempfile.TemporaryDirectory(prefix="lmforge-review-") as fetched:
            shown = item.out_dir
            if nodes and not artifacts.read_manifest(item.out_dir):  # the step's files are on another node
                shown = Path(fetched)
                store.fetch(manifest, REVIEW_FILES, shown)
            show_step(tracker, run_id, name, shown)
        results.append(StepResult(name, "ran" if ran else "cached", seconds if ran else manifest.get("seconds", 0.0),
                                  item.fingerprint, store.location(item.step.base, item.fingerprint) if nodes
                                  else str(item.out_dir), metrics, run_id))
    return results


def show_step(tracker: Tracker, run_id: str, name: str, directory: Path) -> None:
    """A step's MLflow run: its manifest, reports, loss curve and sample tables; then it ends."""
    tracker.log_artifacts(run_id, [directory / file for file in REVIEW_FILES[:4]])
    tracker.log_loss_curve(run_id, directory / "train_log.jsonl", f"{name} loss")
    tracker.log_jsonl_table(run_id, directory / "samples.jsonl", "samples.json")
    tracker.log_jsonl_table(run_id, directory / "dropped_examples.jsonl", "dropped_examples.json")
    tracker.end(run_id)


def run_step(item: PlannedStep, inputs: dict, root: Path, resources: dict, tracker: Tracker, run_id: str,
             nodes: NodeRoots | None = None) -> dict:
    log_metrics = tracker.metric_logger(run_id)
    training = item.step.train is not None
    work_dir = artifacts.partial_dir(root, item.step.base, item.fingerprint)  # kept when an attempt fails
    base = {
        "step": item.step.base, "version": item.step.version, "fingerprint": item.fingerprint,
        "config": redact(item.view), "upstream": item.upstream, "code_version": artifacts.code_version(),
        "started_at": time.time(), "mlflow_run_id": run_id,
    }
    if training and not nodes:
        staging = work_dir
        staging.mkdir(parents=True, exist_ok=True)
    elif not nodes:
        staging = artifacts.staging_dir(root, item.step.base, item.fingerprint)
    else:
        staging = work_dir  # not made: the step runs and publishes on its node
    try:
        if nodes and training:
            run_training_step(item, inputs, staging, log_metrics, root, nodes, base)
            artifacts.remove_train_runs(root, item.step.base, item.fingerprint)  # published by rank 0; kept on failure
            return nodes.here()[1].manifest(item.step.base, item.fingerprint)
        if nodes:
            import ray

            task = ray.remote(num_cpus=1)(_run_task_on_node)
            return ray.get(task.remote(item.step, item.section, item.upstream, base, log_metrics, nodes))
        if training:
            metrics, node_ids = run_training_step(item, inputs, staging, log_metrics, root)
        else:
            metrics, node_ids = run_data_step(item, inputs, staging, log_metrics, resources, work_dir)
    except BaseException as error:
        full = out_of_space(error, staging)
        if not training and not nodes:  # a training step keeps its checkpoints for the next attempt
            shutil.rmtree(staging, ignore_errors=True)
        record_failure(tracker, run_id, error)
        if full:
            raise DiskFull(f"{item.step.name}: no space left on the device of {staging.parent.parent} "
                           f"({type(error).__name__}: {error_line(error)}); free some space and rerun: finished "
                           f"steps are kept, and nothing of {item.step.name} was taken as a result") from error
        raise
    manifest = artifacts.publish(staging, item.out_dir, finished(base, inputs, metrics, node_ids))
    shutil.rmtree(work_dir, ignore_errors=True)  # a data step's finished work units (a training step's moved)
    if training:
        artifacts.remove_train_runs(root, item.step.base, item.fingerprint)  # kept when an attempt fails
    return manifest


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
