"""What a run shows and records about its results: the plan, the summary table, the evaluation
beside its baselines with intervals, the comparison of fine-tuning branches; on the MLflow parent
run the reviewer's material (tags, the DAG picture, the evaluation table, final metrics), and the
registry policy (each fine-tuned result a version of a registered model). Called by run.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from conf.schema import Config
from pipelines import artifacts, dag, executor, figures, tracking
from pipelines.redaction import redact_text
from tasks import baselines, taskdata


def print_plan(planned: list[dag.PlannedStep]) -> None:
    print("plan:", flush=True)
    width = max(9, *(len(item.step.name) for item in planned))
    for item in planned:
        print(f"  {item.step.name:<{width}} {item.status:<6} {item.fingerprint}  {item.reason}", flush=True)


def print_precision(chosen: dict) -> None:
    """What `precision: auto` became for each training section, and why (tasks/precision.py)."""
    for reason in sorted({c.reason for c in chosen.values()}):
        keys = ", ".join(k for k, c in chosen.items() if c.reason == reason)
        print(f"precision: {next(c.precision for c in chosen.values() if c.reason == reason)} for {keys} ({reason})",
              flush=True)


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


def input_example(cfg: Config, results: list[executor.StepResult], local_dir) -> str:
    """A prompt as the models saw them: the first test record through the task's template."""
    split = next((Path(local_dir(r)) / "test.jsonl" for r in results if r.name == "taskdata"), None)
    if split is None or not split.exists():
        return "The"
    with open(split) as lines:
        head, text, tail, _ = taskdata.render(json.loads(lines.readline()), cfg.task)
    return head + text + tail


def register_models(cfg: Config, tracker: tracking.Tracker, results: list[executor.StepResult],
                    local_dir=lambda result: Path(result.out_dir)) -> dict:
    """Each fine-tuned result as a version of a registered model (one per branch), with the alias;
    a pretrained model that ran in this launch as an MLflow model of its step's run.
    local_dir(result): the step's directory here (fetched when paths.root is a URI)."""
    base = cfg.tracking.registered_model or f"lmforge-{cfg.experiment_name}"
    scores = {r.name.split(".", 1)[-1] if "." in r.name else "": r.metrics for r in results
              if r.name.split(".")[0] == "evaluate"}
    example = input_example(cfg, results, local_dir)
    versions = {}
    for r in results:
        if r.name == "pretrain" and r.status == "ran":
            tracker.log_model(r.run_id, "pretrained", local_dir(r) / "model", example)
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
        versions[name] = tracker.register_model(name, cfg.tracking.model_alias, r.run_id, dirs, tags, example)
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
