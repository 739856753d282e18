"""What an object-store artifact root costs against a shared local one, measured in the same run.

The same experiment runs end to end (embedded Ray, a fresh root each time) with
`paths.root=<dir>` (the reference) and with `paths.root=file://<store>` plus its own working copy
(`paths.cache`), where every step fetches its inputs from the store and uploads its result, and
training checkpoints go through it too. The two alternate for --repeats rounds, so a passing load
hits both alike. Printed: each step's seconds (median over the rounds) for both and their ratio,
the whole run's wall seconds and ratio, and the bytes the store holds. The results (every
step's fingerprint and metrics but timings) must be identical.

    python benchmarks/object_store_root.py [--experiment tiny] [--repeats 2] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEASURED_KEYS = re.compile(r"(seconds|_s$|per_s|mfu|throughput|memory)")  # measurements, not results


def run(experiment: str, root: str, extra: list[str]) -> tuple[float, dict]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", f"+experiment={experiment}", f"paths.root={root}",
                           "ray.num_cpus=2", *extra], cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode:
        sys.exit(f"run failed ({root}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(Path(re.search(r"summary JSON:\s+(\S+)", proc.stdout).group(1)).read_text())
    return wall, summary


def results(summary: dict) -> dict:
    """What must not depend on where the steps were stored: fingerprints and metrics but measurements."""
    return {s["name"]: (s["fingerprint"], {k: v for k, v in s["metrics"].items() if not MEASURED_KEYS.search(k)})
            for s in summary["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="tiny")
    parser.add_argument("--repeats", type=int, default=2)
    args, overrides = parser.parse_known_args()
    walls = {"shared": [], "store": []}
    steps = {"shared": {}, "store": {}}
    outcomes, stored_bytes = {}, 0
    for round_ in range(args.repeats):
        for kind in (("shared", "store") if round_ % 2 == 0 else ("store", "shared")):
            with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
                if kind == "shared":
                    wall, summary = run(args.experiment, f"{tmp}/root", overrides)
                else:
                    wall, summary = run(args.experiment, f"file://{tmp}/store", [f"paths.cache={tmp}/cache", *overrides])
                    stored_bytes = sum(p.stat().st_size for p in Path(tmp, "store").rglob("*") if p.is_file())
                shutil.rmtree(tmp, ignore_errors=True)
            walls[kind].append(wall)
            for step in summary["steps"]:
                steps[kind].setdefault(step["name"], []).append(step["seconds"])
            outcomes.setdefault(kind, results(summary))
            print(f"round {round_ + 1} {kind:<6} {wall:7.1f} s", flush=True)
    differ = {name: (outcomes["shared"][name], outcomes["store"].get(name)) for name in outcomes["shared"]
              if outcomes["shared"][name] != outcomes["store"].get(name)}
    if differ:
        sys.exit(f"the results differ between a shared root and an object-store root: {differ}")
    print(f"\n{'step':<16} {'shared s':>9} {'store s':>9} {'ratio':>7}")
    for name in steps["shared"]:
        shared, store = statistics.median(steps["shared"][name]), statistics.median(steps["store"][name])
        print(f"{name:<16} {shared:>9.1f} {store:>9.1f} {store / shared:>7.2f}")
    shared, store = statistics.median(walls["shared"]), statistics.median(walls["store"])
    print(f"{'whole run':<16} {shared:>9.1f} {store:>9.1f} {store / shared:>7.2f}")
    print(f"\nthe store holds {stored_bytes / 1e6:.1f} MB; results identical in both ({len(outcomes['shared'])} steps)")


if __name__ == "__main__":
    main()
