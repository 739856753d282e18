"""Where pipeline runs stand, read from the artifact root (run summaries, step manifests, step
locks) and from MLflow (runs still going and failed ones, which have no summary yet).

    python -m pipelines.status [--root DIR|URI]           # recent runs
    python -m pipelines.status [--root DIR|URI] RUN_ID    # each step of one run

A run is `running` while its launch holds `runs/.live-<run id>` (a heartbeat, the launch's pid),
`finished`, `failed` (with its one-line error), `killed`, or `interrupted` (MLflow says running but
the launch died: a SIGKILL, a lost machine; rerun the same command to continue).
A step is `cached` (an earlier result was used), `done`, `running` (its lock has a fresh
heartbeat and its holder is alive), `failed` or `stopped` (its MLflow run says so; the error line
is shown), or `interrupted` (its MLflow run never ended and no launch holds its lock).
The root is --root, else $LMFORGE_ROOT, else ./lmforge_runs; MLflow is --tracking-uri, else
$MLFLOW_TRACKING_URI, else the SQLite store under the root. A URI root (s3://..., file://...) is
read from the store: its run summaries and step manifests; locks and the default MLflow store
are then this machine's working copy (paths.cache / $LMFORGE_CACHE).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pipelines import artifacts, locks, tracking
from pipelines import store as store_module
from tasks.common import UserError

STATES = {"FAILED": "failed", "KILLED": "stopped"}


@dataclass
class StepRow:
    name: str
    state: str
    seconds: float | None
    out_dir: Path | str
    node_ids: list[str] = field(default_factory=list)
    error: str = ""


def step_state(summary_status: str | None, mlflow_status: str | None, mlflow_tag: str | None,
               published: bool, active: bool) -> str:
    """One step's state from what the run summary, the step's MLflow run and the root say."""
    if summary_status:
        return "cached" if summary_status == "cached" else "done"
    if mlflow_status in STATES:
        return STATES[mlflow_status]
    if mlflow_tag == "cached":
        return "cached"
    if mlflow_status == "RUNNING":
        return "running" if active else ("done" if published else "interrupted")
    return "done" if published else "unknown"


def lock_is_fresh(root: Path, step: str, fingerprint: str) -> bool:
    return locks.is_held(locks.lock_path(root, step, fingerprint))


def run_state(root: Path, parent: dict, remote_root: bool) -> str:
    """A pipeline run's state: MLflow's, except that a run MLflow still calls running whose launch
    no longer holds its live marker died (killed, or its machine went away): `interrupted`. With a
    URI root the marker is on the launching machine, so there MLflow's word stands."""
    state = parent["status"].lower()
    if state != "running" or locks.is_held(locks.lock_path(root, "runs", parent["run_id"], kind="live")):
        return state
    return state if remote_root else "interrupted"


def experiment_of(parent: dict) -> str:
    """A parent run's experiment_name (its run name may carry a cache mark: 'tiny (cached 7/7)')."""
    return parent["tags"].get("lmforge.experiment") or parent["name"]


def step_row(root: Path, name: str, fingerprint: str, summary_step: dict | None, child: dict | None,
             store=None) -> StepRow:
    base = name.split(".")[0]
    out_dir = store.location(base, fingerprint) if store else artifacts.step_dir(root, base, fingerprint)
    manifest = (store.manifest(base, fingerprint) if store else artifacts.read_manifest(out_dir)) or {}
    state = step_state((summary_step or {}).get("status"), (child or {}).get("status"),
                       (child or {}).get("tags", {}).get("lmforge.status"), bool(manifest),
                       lock_is_fresh(root, base, fingerprint))
    if summary_step:
        seconds = summary_step["seconds"]
    elif state in ("done", "cached") and manifest:
        seconds = manifest.get("seconds")
    elif child and child.get("start"):
        seconds = ((child.get("end") or time.time() * 1000) - child["start"]) / 1000
    else:
        seconds = None
    error = (child or {}).get("tags", {}).get("lmforge.error", "") if state in ("failed", "stopped") else ""
    return StepRow(name, state, seconds, out_dir, manifest.get("placement", {}).get("node_ids", []), error)


def run_steps(root: Path, summary: dict | None, children: list[dict], store=None) -> list[StepRow]:
    """Each step of one run: the summary's steps (a finished run), else the steps MLflow has seen."""
    by_name = {c["tags"].get("lmforge.step", c["name"]): c for c in children}
    if summary:
        return [step_row(root, s["name"], s["fingerprint"], s, by_name.get(s["name"]), store) for s in summary["steps"]]
    ordered = sorted(children, key=lambda c: c.get("start") or 0)
    return [step_row(root, name, c["tags"].get("lmforge.fingerprint", ""), None, c, store)
            for c in ordered if (name := c["tags"].get("lmforge.step"))]


def load_summaries(root: Path, store=None) -> dict[str, dict]:
    """Run summaries under the root, and in the store when the root is one."""
    found = {}
    for path in (root / "runs").glob("*.json"):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found[summary.get("run_id", path.stem)] = {**summary, "written_at": path.stat().st_mtime}
    for summary, written_at in store.summaries() if store else ():
        found.setdefault(summary.get("run_id", ""), {**summary, "written_at": written_at})
    return found


def tracking_uri(root: Path, configured: str | None) -> str | None:
    """The MLflow store to read, or None when there is none to read (never creates one)."""
    uri = tracking.resolve_uri(configured, root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    reason = tracking.unreachable(uri)
    if reason:
        print(f"note: MLflow at {uri} is not reachable ({reason}); showing what the artifact root has", file=sys.stderr)
        return None
    return uri


def when(ms_or_s: float | None) -> str:
    if not ms_or_s:
        return "-"
    seconds = ms_or_s / 1000 if ms_or_s > 1e11 else ms_or_s
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def list_runs(summaries: dict[str, dict], parents: list[dict], limit: int,
              state_of=lambda parent: parent["status"].lower()) -> list[dict]:
    """Recent runs, newest first: MLflow's parent runs, and summaries MLflow does not have."""
    rows = {}
    for run_id, s in summaries.items():
        counts = [f"{sum(step['status'] == k for step in s['steps'])} {k}" for k in ("ran", "cached")]
        rows[run_id] = {"run_id": run_id, "experiment": s.get("experiment", ""), "state": "finished",
                        "time": s["written_at"], "steps": ", ".join(counts)}
    for p in parents:
        row = rows.setdefault(p["run_id"], {"run_id": p["run_id"], "experiment": experiment_of(p), "steps": "-"})
        row.update(state=state_of(p), time=p["start"] / 1000)
    return sorted(rows.values(), key=lambda r: r["time"], reverse=True)[:limit]


def print_runs(rows: list[dict]) -> None:
    print(f"{'run id':<32}  {'experiment':<16} {'state':<9} {'time':<19}  steps")
    for r in rows:
        print(f"{r['run_id']:<32}  {r['experiment']:<16} {r['state']:<9} {when(r['time']):<19}  {r['steps']}")


def print_steps(rows: list[StepRow]) -> None:
    width = max(9, *(len(r.name) for r in rows)) if rows else 9
    print(f"  {'step':<{width}} {'state':<11} {'seconds':>8}  {'node':<8}  output")
    for r in rows:
        seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
        nodes = ",".join(n[:8] for n in r.node_ids) or "-"
        print(f"  {r.name:<{width}} {r.state:<11} {seconds:>8}  {nodes:<8}  {r.out_dir}")
        if r.error:
            print(f"  {'':<{width}} error: {r.error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id", nargs="?", help="a pipeline run (its MLflow parent run id); omitted: list runs")
    parser.add_argument("--root", default=os.environ.get("LMFORGE_ROOT", "lmforge_runs"), help="paths.root of the runs")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default as for pipelines.run)")
    parser.add_argument("--experiment", default="lmforge", help="MLflow experiment (tracking.experiment)")
    parser.add_argument("--limit", type=int, default=20, help="runs listed")
    args = parser.parse_args(argv)
    store = None
    if store_module.is_uri(args.root):
        try:
            store = store_module.open_store(args.root, "--root")
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        root = store_module.cache_root("")
    else:
        root = Path(args.root).resolve()
        if not root.is_dir():
            print(f"error: --root {root} is not a folder of runs (no such folder); give the paths.root your "
                  f"runs used, or set $LMFORGE_ROOT", file=sys.stderr)
            return 2
    uri = tracking_uri(root, args.tracking_uri)
    summaries = load_summaries(root, store)
    state_of = lambda parent: run_state(root, parent, remote_root=store is not None)
    if args.run_id is None:
        parents = tracking.find_runs(uri, args.experiment, limit=args.limit) if uri else []
        print_runs(list_runs(summaries, parents, args.limit, state_of))
        return 0
    summary = summaries.get(args.run_id)
    parent = tracking.find_run(uri, args.run_id) if uri else None
    if summary is None and parent is None:
        print(f"error: no run {args.run_id} under {store.uri if store else root}" + ("" if uri else " (and no MLflow store to ask)"),
              file=sys.stderr)
        return 2
    children = tracking.find_runs(uri, args.experiment, parent_id=args.run_id) if parent else []
    experiment = (summary or {}).get("experiment") or experiment_of(parent)
    print(f"run {args.run_id} ({experiment}): {state_of(parent) if parent else 'finished'}, "
          f"root {store.uri if store else root}")
    if parent and parent["tags"].get("lmforge.error"):
        print(f"error: {parent['tags']['lmforge.error']}")
    print_steps(run_steps(root, summary, children, store))
    return 0


if __name__ == "__main__":
    sys.exit(main())
