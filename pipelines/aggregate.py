"""Mean and spread of a sweep's results: the task metrics and perplexities of several pipeline runs
(a seed sweep, typically), per step, with what the runs' configs differ in, so that a difference
between two settings can be judged against the run-to-run spread of one.

    python -m pipelines.run -m +experiment=quickstart finetune.seed=0,1,2     # three runs
    python -m pipelines.aggregate [--root DIR] --last 3                        # their mean and spread
    python -m pipelines.aggregate [--root DIR] RUN_ID RUN_ID ...

The runs are read from the run summaries under the root (`<root>/runs/<run id>.json`) and the
configs from their steps' manifests. The spread is the sample standard deviation and the range;
`ci95` is the t-interval of the mean (n - 1 degrees of freedom).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from pipelines import artifacts
from tasks.common import UserError

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}
"""Two-sided 95% quantiles of Student's t by degrees of freedom (the largest tabled one at or below is used)."""


def read_runs(root: Path, run_ids: list[str], last: int) -> list[dict]:
    runs_dir = root / "runs"
    if run_ids:
        missing = [r for r in run_ids if not (runs_dir / f"{r}.json").is_file()]
        if missing:
            raise UserError(f"run ids: no summary for {', '.join(missing)} under {runs_dir}")
        paths = [runs_dir / f"{r}.json" for r in run_ids]
    else:
        paths = sorted(runs_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)[-last:] if runs_dir.is_dir() else []
    if len(paths) < 2:
        raise UserError(f"--root: {len(paths)} finished run(s) under {runs_dir}; the mean and spread need at least 2")
    return [json.loads(p.read_text()) for p in paths]


def is_reported(step: str, metric: str) -> bool:
    """Task metrics and perplexities of evaluate steps and the key results of the others; not interval
    bounds (their own spread is not the question) nor sizes and timings."""
    if metric.endswith(("_low", "_high")):
        return False
    if step.startswith(("evaluate", "ensemble")):
        return "_accuracy" in metric or "_macro_f1" in metric or metric.startswith("ppl_") or "_delta" in metric \
            or metric.endswith(("_exact_match", "_token_f1", "_rouge_l"))
    return metric.startswith(("final_val_", "val_accuracy"))


def t_quantile(dof: int) -> float:
    return T_975[max(k for k in T_975 if k <= dof)]


def summarize(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    half = t_quantile(len(values) - 1) * sd / math.sqrt(len(values))
    return {"n": len(values), "mean": mean, "sd": sd, "min": min(values), "max": max(values),
            "ci95_low": mean - half, "ci95_high": mean + half}


def aggregate(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """{step: {metric: summary}} over the runs that report it."""
    values: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        for step in run["steps"]:
            for metric, value in step["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and is_reported(step["name"], metric):
                    values.setdefault((step["name"], metric), []).append(float(value))
    table: dict[str, dict[str, dict]] = {}
    for (step, metric), found in sorted(values.items()):
        table.setdefault(step, {})[metric] = summarize(found)
    return table


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(value, sort_keys=True)}


def config_differences(runs: list[dict]) -> dict[str, list[str]]:
    """{config key: the runs' values} for every key of any step's config that is not the same in all runs
    (paths and placement fields are in the manifests' configs as they were run)."""
    per_run = []
    for run in runs:
        merged = {}
        for step in run["steps"]:
            manifest = artifacts.read_manifest(Path(step["out_dir"])) or {}
            merged.update(flatten(manifest.get("config", {})))
        per_run.append(merged)
    keys = sorted(set().union(*per_run))
    return {k: [r.get(k, "-") for r in per_run] for k in keys if len({r.get(k, "-") for r in per_run}) > 1}


def print_report(runs: list[dict], table: dict, differences: dict) -> None:
    print(f"{len(runs)} runs: " + ", ".join(r["run_id"] for r in runs))
    if differences:
        print("they differ in: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in differences.items()))
    else:
        print("their configs are the same (a repeat: the spread is the pipeline's nondeterminism)")
    print(f"\n  {'step':<16} {'metric':<34} {'n':>2} {'mean':>9} {'sd':>8} {'min':>9} {'max':>9}   95% CI of the mean")
    for step, metrics in table.items():
        for metric, s in metrics.items():
            print(f"  {step:<16} {metric:<34} {s['n']:>2} {s['mean']:>9.4g} {s['sd']:>8.3g} {s['min']:>9.4g} "
                  f"{s['max']:>9.4g}   [{s['ci95_low']:.4g}, {s['ci95_high']:.4g}]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_ids", nargs="*", help="run ids (default: the --last finished runs)")
    parser.add_argument("--root", default=os.environ.get("LMFORGE_ROOT", "lmforge_runs"))
    parser.add_argument("--last", type=int, default=3, help="the last N finished runs (default 3)")
    parser.add_argument("--json", type=Path, help="also write {step: {metric: summary}} here")
    args = parser.parse_args(argv)
    try:
        runs = read_runs(Path(args.root), args.run_ids, args.last)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    table = aggregate(runs)
    print_report(runs, table, config_differences(runs))
    if args.json:
        args.json.write_text(json.dumps({"runs": [r["run_id"] for r in runs], "metrics": table}, indent=2))


if __name__ == "__main__":
    main()
