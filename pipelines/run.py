"""Entry point: compose the Hydra config -> validate -> plan -> execute on Ray -> summary.

    python -m pipelines.run +experiment=quickstart [overrides]
    python -m pipelines.run +experiment=quickstart dry_run=true      # the plan only
    python -m pipelines.run -m +experiment=quickstart finetune.lora.r=4,8   # a sweep
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from conf.schema import HYDRA_MADE, Config, register_configs
from pipelines import artifacts, dag, executor, locks, report, serving_models, stopping, storage, tracking
from pipelines.redaction import redact, redact_override, redact_text
from pipelines.validate import check_composed, validate
from tasks import precision
from tasks.common import UserError, write_json

register_configs()


def live_path(root: Path, run_id: str) -> Path:
    """Held (with a heartbeat) while the run executes: `pipelines.status` tells a live run from a dead one by it."""
    return locks.lock_path(root, "runs", run_id, kind="live")


def run_pipeline(cfg: Config, resolved_yaml: str, on_valid=lambda: None) -> dict:
    """on_valid(): called once the config and inputs passed their checks, before anything is made."""
    validate(cfg)  # first: a bad paths.root must not be created
    storage.check_root(cfg.paths)
    cfg, chosen = precision.resolve(cfg)  # before planning: the fingerprint holds the precision trained in
    on_valid()
    report.print_precision(chosen)
    steps_storage = storage.open_storage(cfg.paths)  # where results live: shared root, step store, object store
    root = steps_storage.root
    root.mkdir(parents=True, exist_ok=True)
    planned = dag.plan(cfg, root, store=steps_storage.step_store)
    report.print_plan(planned)
    if cfg.dry_run:
        return {"plan": [{"step": p.step.name, "status": p.status, "reason": p.reason} for p in planned]}

    uri = tracking.resolve_uri(cfg.tracking.uri, root)
    tracker = tracking.Tracker(uri, cfg.tracking.experiment, root, cfg.tracking.on_unreachable)
    resources = executor.start_ray(cfg) if any(p.status == "run" for p in planned) else {}  # all cached: no Ray
    try:
        if resources:
            executor.check_resources(planned, resources, executor.autoscaler_ceiling())
        run_id = tracker.start(run_name(cfg, planned), dataclasses.asdict(cfg),
                               run_tags(cfg) | {f"lmforge.precision.{key}": c.reason for key, c in chosen.items()})
        tracker.log_text(run_id, resolved_yaml, "config.yaml")
        with locks.step_lock(live_path(root, run_id), say=print):
            results = execute(planned, steps_storage, tracker, run_id, resources)
            return record_run(cfg, tracker, run_id, planned, results, steps_storage)
    finally:
        executor.stop_ray()


def run_name(cfg: Config, planned: list[dag.PlannedStep]) -> str:
    """experiment_name, marked when steps come from the cache ('tiny (cached 7/7)'): a rerun's parent
    run is told apart from the run that computed its results."""
    cached = sum(p.status == "cached" for p in planned)
    return f"{cfg.experiment_name} (cached {cached}/{len(planned)})" if cached else cfg.experiment_name


def run_tags(cfg: Config) -> dict:
    """The parent run's tags: the experiment and the code, with MLflow's source tags where git knows the commit."""
    version = artifacts.code_version()
    tags = {"lmforge.code_version": version, "lmforge.experiment": cfg.experiment_name,
            "mlflow.source.name": "pipelines.run", "mlflow.source.type": "LOCAL"}
    if version != "unknown":
        tags["mlflow.source.git.commit"] = version.removesuffix("+dirty")
    return tags


def execute(planned: list[dag.PlannedStep], steps_storage: storage.Storage, tracker: tracking.Tracker, run_id: str,
            resources: dict) -> list[executor.StepResult]:
    """The steps, run; a failure is recorded on the parent run (its one-line reason, FAILED or KILLED)."""
    try:
        with stopping.STOP:
            return executor.execute(planned, steps_storage, tracker, resources)
    except BaseException as error:
        executor.record_failure(tracker, run_id, error)
        with contextlib.suppress(Exception):  # reporting must not hide the error either
            report.report_tracking(tracker.finish(), tracker.uri)
        raise


def record_run(cfg: Config, tracker: tracking.Tracker, run_id: str, planned: list[dag.PlannedStep],
               results: list[executor.StepResult], steps_storage: storage.Storage) -> dict:
    """The run summary (runs/<run id>.json), the parent run's review material and registered models."""
    uri, root = tracker.uri, steps_storage.root
    summary = {
        "run_id": run_id, "experiment": cfg.experiment_name, "tracking_uri": redact_text(uri), "root": str(root),
        "steps": [dataclasses.asdict(r) for r in results],
    }
    summary_path = root / "runs" / f"{run_id}.json"
    summary_path.parent.mkdir(exist_ok=True)
    write_json(summary_path, summary)
    tracker.log_artifacts(run_id, [summary_path])

    def local_dir(result: executor.StepResult) -> Path:
        """What is registered, here (fetched first where the steps are in the store)."""
        return steps_storage.local_step(result.name.split(".")[0], result.fingerprint)

    summary["registered_models"] = report.track_results(cfg, tracker, run_id, planned, results, local_dir)
    tracker.end(run_id)
    summary["tracking"] = tracker.finish()
    write_json(summary_path, summary)
    steps_storage.keep_summary(run_id, summary)
    report.print_summary(results, run_id, uri, summary_path)
    report.report_tracking(summary["tracking"], uri)
    return summary


def write_run_record(dict_cfg: DictConfig) -> None:
    """The composed config and the command-line overrides in Hydra's run folder (.hydra/), secrets masked:
    Hydra's own copies (switched off by hydra.output_subdir=null) would hold them in clear."""
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    config = redact(OmegaConf.to_container(dict_cfg, resolve=False))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    overrides = [redact_override(o) for o in hydra_cfg.overrides.task]
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))


def describe_failure(exc: BaseException) -> tuple[str, bool]:
    """One line for the user, and whether it is a UserError (bad input or config)."""
    return executor.failure_line(exc), executor.cause_of(exc, (UserError,)) is not None


@contextlib.contextmanager
def removed_unless_started(run_folder: Path):
    """A run that stops at its checks (its record, .hydra/config.yaml, not written) leaves nothing
    behind: Hydra's run folder goes, and the empty folders Hydra made for it (hydra/, the root on a
    first run), up to the topmost one that did not exist before."""
    try:
        yield
    finally:
        if not (run_folder / ".hydra" / "config.yaml").exists():
            shutil.rmtree(run_folder, ignore_errors=True)
            top, folder = HYDRA_MADE.get("top"), run_folder.parent
            while top and folder.is_relative_to(top) and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    try:
        with removed_unless_started(Path(HydraConfig.get().runtime.output_dir)):
            check_composed(dict_cfg, HydraConfig.get().runtime.choices)
            cfg: Config = OmegaConf.to_object(dict_cfg)
            resolved = redact(OmegaConf.to_container(dict_cfg, resolve=True))
            summary = run_pipeline(cfg, OmegaConf.to_yaml(OmegaConf.create(resolved)),
                                   on_valid=lambda: write_run_record(dict_cfg))
            serving_models.after_run(cfg, summary)  # the serve command, or with serve.enabled the server
    except KeyboardInterrupt:
        print("interrupted: finished steps are kept; rerun to continue", file=sys.stderr)
        sys.exit(130)
    except stopping.Preempted as stopped:
        print(str(stopped), file=sys.stderr)
        sys.exit(stopped.exit_code)
    except Exception as exc:  # every failure ends in one readable line; details are in the step logs above
        message, is_user_error = describe_failure(exc)
        print(f"error: {redact_text(message)}", file=sys.stderr)
        sys.exit(2 if is_user_error else 1)


if __name__ == "__main__":
    main()
