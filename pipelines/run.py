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

from conf.schema import HYDRA_MADE, Config, register_configs, usable_folder
from pipelines import artifacts, dag, executor, figures, locks, stopping, store, tracking
from pipelines.redaction import redact, redact_override, redact_text
from pipelines.validate import check_composed, validate
from tasks import baselines
from tasks.common import UserError, write_json

register_configs()


def print_plan(planned: list[dag.PlannedStep]) -> None:
    print("plan:", flush=True)
    width = max(9, *(len(item.step.name) for item in planned))
    for item in planned:
        print(f"  {item.step.name:<{width}} {item.status:<6} {item.fingerprint}  {item.reason}", flush=True)


def format_metric(step: str, metrics: dict) -> str:
    keys = executor.KEY_METRIC.get(step.split(".")[0], ())
    key = next((k for k in ((keys,) if isinstance(keys, str) else keys) if k in metrics), None)
    value = metrics.get(key)
    if value is None:
        return ""
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def print_summary(results: list[executor.StepResult], run_id: str, uri: str, summary_path: Path) -> None:
    print("\nsummary:")
    width = max(9, *(len(r.name) for r in results))
    print(f"  {'step':<{width}} {'status':<7} {'seconds':>8}  key metric")
    for r in results:
        print(f"  {r.name:<{width}} {r.status:<7} {r.seconds:>8.1f}  {format_metric(r.name, r.metrics)}")
    evaluation = next((r.metrics for r in results if r.name == "evaluate"), {})
    if evaluation:
        print_evaluation(evaluation)
    if any(r.name.startswith("evaluate.") for r in results):
        print_comparison(results)
    print(f"\nMLflow parent run: {run_id}")
    print(f"review it with:    {tracking.ui_command(uri)}")
    print(f"summary JSON:      {summary_path}", flush=True)


BASELINES = ("majority", "tfidf_logreg", "zero_shot", "untuned", "no_pretraining")
INTERVAL = ("_low", "_high")
LIKELIHOOD_VARIANTS = ("lengthnorm", "calibrated")
"""The fine-tuned model's label likelihoods per token and calibrated (objective=lm)."""


def task_metric_names(metrics: dict, model: str) -> list[str]:
    """The task metrics of one model in an evaluate step's metrics, without interval bounds."""
    return sorted(k[len(model) + 1:] for k in metrics
                  if k.startswith(model + "_") and not k.endswith(INTERVAL) and not k.startswith(model + "_vs_"))


def with_interval(metrics: dict, key: str) -> str:
    """`0.812 [0.790, 0.833]` where the 95% bootstrap interval is known."""
    value = metrics.get(key)
    if value is None:
        return "-"
    low, high = metrics.get(key + "_low"), metrics.get(key + "_high")
    return f"{value:.3f}" if low is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def print_evaluation(metrics: dict) -> None:
    """Each model beside its baselines: perplexity on held-out pretraining text, then the task metrics
    with their 95% bootstrap intervals, then the fine-tuned model's paired differences with the baselines."""
    ppl = {k[4:]: v for k, v in metrics.items() if k.startswith("ppl_")}
    print("\nheld-out perplexity: " + ", ".join(f"{k} {v:.1f}" for k, v in ppl.items()))
    models = [m for m in (*BASELINES, "finetuned", *LIKELIHOOD_VARIANTS) if task_metric_names(metrics, m)]
    names = sorted({n for m in models for n in task_metric_names(metrics, m)})
    width = max(len("task"), *(len(m) for m in models))
    print(f"  {'task':<{width}} " + " ".join(f"{n:>24}" for n in names))
    for model in models:
        print(f"  {model:<{width}} " + " ".join(f"{with_interval(metrics, f'{model}_{n}'):>24}" for n in names))
    for name in BASELINES:
        if f"finetuned_vs_{name}_delta" in metrics:
            low, high = metrics[f"finetuned_vs_{name}_low"], metrics[f"finetuned_vs_{name}_high"]
            verdict = baselines.verdict(low, high).replace("worse", "WORSE")
            print(f"  finetuned - {name}: accuracy {metrics[f'finetuned_vs_{name}_delta']:+.3f} "
                  f"[{low:+.3f}, {high:+.3f}] {verdict}")


def comparison_rows(results: list[executor.StepResult]) -> tuple[list[str], list[dict]]:
    """One row per fine-tuning branch, after the baselines (majority class, untuned model)."""
    by_name = {r.name: r.metrics for r in results}
    branches = [r.name.split(".", 1)[1] for r in results if r.name.startswith("evaluate.")]
    first = by_name[f"evaluate.{branches[0]}"]
    metrics = task_metric_names(first, "finetuned")
    rows = [{"model": name, **{m: first.get(f"{name}_{m}") for m in metrics}} for name in BASELINES
            if any(f"{name}_{m}" in first for m in metrics)]
    for branch in branches:
        tuned, scores = by_name.get(f"finetune.{branch}", {}), by_name[f"evaluate.{branch}"]
        rows.append({"model": branch, "trainable": tuned.get("trainable_parameters"),
                     "train_s": tuned.get("train_seconds"), "val_loss": tuned.get("final_val_loss"),
                     "ppl": scores.get("ppl_finetuned"), **{m: scores.get(f"finetuned_{m}") for m in metrics}})
    if "ensemble" in by_name:  # eval.ensemble: the branches' mean label probabilities
        rows.append({"model": "ensemble", **{m: by_name["ensemble"].get(f"ensemble_{m}") for m in metrics}})
    return ["trainable", "train_s", "val_loss", "ppl", *metrics], rows


def print_comparison(results: list[executor.StepResult]) -> None:
    columns, rows = comparison_rows(results)
    print("\nfine-tuning branches against the baselines (task metrics on the test split):")
    print(f"  {'model':<10} " + " ".join(f"{c:>11}" for c in columns))
    show = lambda v: f"{'-':>11}" if v is None else (f"{v:>11,}" if isinstance(v, int) else f"{v:>11.3f}")
    for row in rows:
        print(f"  {row['model']:<10} " + " ".join(show(row.get(c)) for c in columns))


def evaluation_rows(results: list[executor.StepResult]) -> list[dict]:
    """The evaluation table of a run: one row per model (baselines, then each fine-tuned one)."""
    if any(r.name.startswith("evaluate.") for r in results):
        return comparison_rows(results)[1]
    metrics = next((r.metrics for r in results if r.name == "evaluate"), {})
    models = [m for m in (*BASELINES, "finetuned") if task_metric_names(metrics, m)]
    return [{"model": m, **{k[len(m) + 1:]: v for k, v in metrics.items() if k.startswith(m + "_")}}
            for m in models]


def register_models(cfg: Config, tracker: tracking.Tracker, results: list[executor.StepResult],
                    local_dir=lambda result: Path(result.out_dir)) -> dict:
    """Each fine-tuned result as a version of a registered model (one per branch), with the alias.
    local_dir(result): the step's directory here (fetched when paths.root is a URI)."""
    base = cfg.tracking.registered_model or f"lmforge-{cfg.experiment_name}"
    scores = {r.name.split(".", 1)[-1] if "." in r.name else "": r.metrics for r in results
              if r.name.split(".")[0] == "evaluate"}
    versions = {}
    for r in results:
        if r.name.split(".")[0] != "finetune":
            continue
        branch = r.name.split(".", 1)[1] if "." in r.name else ""
        here = local_dir(r)
        dirs = {sub: here / sub for sub in ("merged", "model", "adapter") if (here / sub).is_dir()}
        metric = {k: f"{v:.4g}" for k, v in scores.get(branch, {}).items() if k.startswith("finetuned_")}
        tags = {"lmforge.fingerprint": r.fingerprint, "lmforge.experiment": cfg.experiment_name,
                "lmforge.code_version": artifacts.code_version(), "lmforge.pipeline_run": tracker.parent_id,
                "lmforge.step_dir": r.out_dir, **metric}
        name = f"{base}-{branch}" if branch else base
        versions[name] = tracker.register_model(name, cfg.tracking.model_alias, r.run_id, dirs, tags)
    return versions


def track_results(cfg: Config, tracker: tracking.Tracker, run_id: str, planned: list[dag.PlannedStep],
                  results: list[executor.StepResult], local_dir=lambda result: Path(result.out_dir)) -> dict:
    """What a reviewer looks at on the parent run: per-step tags, cache hits, the DAG picture,
    the evaluation table, final metrics; and the registered model."""
    cached = sum(r.status == "cached" for r in results)
    tracker.set_tags(run_id, {"lmforge.cache_hits": f"{cached}/{len(results)}",
                              **{f"lmforge.step.{r.name}": f"{r.status} {r.fingerprint}" for r in results}})
    by_name = {r.name: r for r in results}
    nodes = [{"name": p.step.name, "deps": (*p.step.deps, *p.step.members), "status": by_name[p.step.name].status,
              "seconds": by_name[p.step.name].seconds} for p in planned]
    tracker.log_figure(run_id, lambda png: figures.dag_picture(nodes, png), "dag.png")
    tracker.log_table(run_id, evaluation_rows(results), "evaluation.json")
    final = {(k if r.name == "evaluate" else f"{r.name.split('.', 1)[1]}.{k}"): v
             for r in results if r.name.split(".")[0] == "evaluate" for k, v in r.metrics.items()}
    tracker.log_metrics(run_id, final)
    return register_models(cfg, tracker, results, local_dir) if cfg.tracking.register_model else {}


def report_tracking(outcome: dict, uri: str) -> None:
    if not outcome:
        return
    if outcome["replayed"]:
        print(f"tracking: the MLflow server was unreachable for part of the run ({outcome['lost']}); the "
              f"{outcome['calls']} calls kept meanwhile were replayed to it", flush=True)
    else:
        print(f"tracking: the MLflow server {redact_text(uri)} could not be reached ({outcome['lost']}); nothing is "
              f"lost: {outcome['calls']} calls are kept in {outcome['journal']}\n"
              f"send them when it is back: python -m pipelines.tracking replay {outcome['journal']}",
              file=sys.stderr, flush=True)


def roots(cfg: Config) -> tuple[Path, store.Store | None, executor.NodeRoots | None]:
    """The local root, the step store, and, when paths.root is a URI (the store is then the root and
    each node keeps its own working copy), how nodes find theirs."""
    if not store.is_uri(cfg.paths.root):
        return Path(cfg.paths.root).resolve(), store.open_store(cfg.paths.store), None
    root = store.cache_root(cfg.paths.cache)
    return root, store.open_store(cfg.paths.root, "paths.root"), executor.NodeRoots(cfg.paths.root, cfg.paths.cache, root)


def live_path(root: Path, run_id: str) -> Path:
    """Held (with a heartbeat) while the run executes: `pipelines.status` tells a live run from a dead one by it."""
    return locks.lock_path(root, "runs", run_id, kind="live")


def run_pipeline(cfg: Config, resolved_yaml: str, on_valid=lambda: None) -> dict:
    """on_valid(): called once the config and inputs passed their checks, before anything is made."""
    validate(cfg)  # first: a bad paths.root must not be created
    if not store.is_uri(cfg.paths.root) and not usable_folder(cfg.paths.root):
        raise UserError(f"paths.root: '{cfg.paths.root}' is not writable here; give a folder this user can write to")
    on_valid()
    root, step_store, nodes = roots(cfg)
    root.mkdir(parents=True, exist_ok=True)
    planned = dag.plan(cfg, root, store=step_store)
    print_plan(planned)
    if cfg.dry_run:
        return {"plan": [{"step": p.step.name, "status": p.status, "reason": p.reason} for p in planned]}

    uri = tracking.resolve_uri(cfg.tracking.uri, root)
    tracker = tracking.Tracker(uri, cfg.tracking.experiment, root, cfg.tracking.on_unreachable)
    resources = executor.start_ray(cfg)
    try:
        executor.check_resources(planned, resources, executor.autoscaler_ceiling())
        tags = {"lmforge.code_version": artifacts.code_version(), "lmforge.experiment": cfg.experiment_name}
        run_id = tracker.start(cfg.experiment_name, dataclasses.asdict(cfg), tags)
        tracker.log_text(run_id, resolved_yaml, "config.yaml")
        with locks.step_lock(live_path(root, run_id), say=print):
            results = execute(planned, root, tracker, run_id, resources, step_store, nodes)
            return record_run(cfg, tracker, run_id, planned, results, root, step_store, nodes)
    finally:
        executor.stop_ray()


def execute(planned: list[dag.PlannedStep], root: Path, tracker: tracking.Tracker, run_id: str, resources: dict,
            step_store: store.Store | None, nodes: executor.NodeRoots | None) -> list[executor.StepResult]:
    """The steps, run; a failure is recorded on the parent run (its one-line reason, FAILED or KILLED)."""
    try:
        with stopping.STOP:
            return executor.execute(planned, root, tracker, resources, step_store, nodes)
    except BaseException as error:
        with contextlib.suppress(Exception):  # recording the failure must not hide it (a full disk)
            tracker.set_tags(run_id, {"lmforge.error": executor.failure_line(error)})
            tracker.end(run_id, "KILLED" if isinstance(error, stopping.Preempted) else "FAILED")
            report_tracking(tracker.finish(), tracker.uri)
        raise


def record_run(cfg: Config, tracker: tracking.Tracker, run_id: str, planned: list[dag.PlannedStep],
               results: list[executor.StepResult], root: Path, step_store: store.Store | None,
               nodes: executor.NodeRoots | None) -> dict:
    """The run summary (runs/<run id>.json), the parent run's review material and registered models."""
    uri = tracker.uri
    summary = {
        "run_id": run_id, "experiment": cfg.experiment_name, "tracking_uri": redact_text(uri), "root": str(root),
        "steps": [dataclasses.asdict(r) for r in results],
    }
    summary_path = root / "runs" / f"{run_id}.json"
    summary_path.parent.mkdir(exist_ok=True)
    write_json(summary_path, summary)
    tracker.log_artifacts(run_id, [summary_path])

    def local_dir(result: executor.StepResult) -> Path:
        if not nodes:
            return Path(result.out_dir)
        base = result.name.split(".")[0]  # the steps are in the store: what is registered is fetched here first
        return store.fetch_steps(step_store, root, {base: result.fingerprint})[base]

    summary["registered_models"] = track_results(cfg, tracker, run_id, planned, results, local_dir)
    tracker.end(run_id)
    summary["tracking"] = tracker.finish()
    write_json(summary_path, summary)
    if nodes:  # where `pipelines.status --root <the URI>` finds it
        step_store.put_json(f"runs/{run_id}.json", summary)
    print_summary(results, run_id, uri, summary_path)
    report_tracking(summary["tracking"], uri)
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
    link, is_user_error = executor.root_error(exc), False
    while link is not None and not is_user_error:
        is_user_error, link = isinstance(link, UserError), link.__cause__
    return executor.failure_line(exc), is_user_error


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
            run_pipeline(cfg, OmegaConf.to_yaml(OmegaConf.create(resolved)), on_valid=lambda: write_run_record(dict_cfg))
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
