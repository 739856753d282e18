"""Leftovers under an artifact root that no later run reads: listed with their sizes and why, and
removed only with --delete.

    python -m pipelines.gc [--root DIR] [--delete] [--older-than HOURS]

Removed:
  <step>/.staging-<fp>-*      a killed attempt's staging directory (the step's next attempt removes it too)
  <step>/.partial-<fp>        the working directory of a step that is published since (<step>/<fp>/_manifest.json)
  <step>/<fp>/                without _manifest.json: an attempt that never finished, never a result
  .ray_train/<attempt>        Ray Train's directory of an attempt that ended: each attempt has its own,
                              and none is read once its attempt ended
  .lock-*, .node-*, .fetch-*, runs/.live-*
                              locks and run markers whose holder exited or stopped its heartbeat, and
                              locks moved aside (*.stale-*) when a launch took them over
Kept: anything of a step whose lock a live launch holds; the `.partial-<fp>` of a step not yet
published (a training step's checkpoints, the ingest step's finished work units: a rerun of the same
config continues from them); published steps, run summaries, the MLflow store and Hydra folders.
--older-than HOURS also keeps what changed more recently.

The root is --root, else $LMFORGE_ROOT, else ./lmforge_runs. For an object-store root (s3://...)
gc cleans this machine's working copy ($LMFORGE_CACHE, else the default paths.cache; give another
paths.cache as --root), never the store.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipelines import artifacts, locks
from pipelines import store as store_module
from tasks import units

FINGERPRINT = r"[0-9a-f]{16}"  # dag.fingerprint
LOCK_KINDS = ("lock", "node", "fetch")  # a launch's, a node's run of the step, a node's download (locks.lock_path)
STEP_LOCK = re.compile(rf"\.(?:{'|'.join(LOCK_KINDS)})-({FINGERPRINT})")
MOVED_ASIDE = re.compile(r"\..+\.stale-[0-9a-f]+")  # locks.take_over_if_stale
WORK_DIR = re.compile(rf"\.(staging|partial)-({FINGERPRINT})(?:-[0-9a-f]+)?")
NOT_STEPS = {"runs", "hydra", "mlartifacts", "mlruns"}  # summaries, Hydra folders, MLflow's files


@dataclass(frozen=True)
class Candidate:
    path: Path
    num_bytes: int
    reason: str
    changed_at: float
    """The newest modification time under the path (--older-than)."""
    keep: bool = False
    guards: tuple[Path, ...] = ()
    """Locks that spare it if a launch holds one when it comes to removing it (it started meanwhile)."""


def candidate(path: Path, reason: str, keep: bool = False, guards: tuple[Path, ...] = ()) -> Candidate:
    """With the bytes under the path and its newest modification time."""
    num_bytes, changed_at = path.lstat().st_size, path.lstat().st_mtime
    if path.is_dir():
        num_bytes = 0
        for file in path.rglob("*"):
            stat = file.lstat()
            num_bytes, changed_at = num_bytes + (stat.st_size if file.is_file() else 0), max(changed_at, stat.st_mtime)
    return Candidate(path, num_bytes, reason, changed_at, keep, guards)


def step_guards(step_dir: Path, fingerprint: str) -> tuple[Path, ...]:
    return tuple(locks.lock_path(step_dir.parent, step_dir.name, fingerprint, kind) for kind in LOCK_KINDS)


def live_holder(guards: tuple[Path, ...]) -> str | None:
    held = [lock for lock in guards if locks.is_held(lock)]
    return locks.holder(held[0]) if held else None


def lock_leftover(lock: Path) -> Candidate | None:
    """A lock or run marker no live process holds."""
    if MOVED_ASIDE.fullmatch(lock.name):
        return candidate(lock, "a lock moved aside when a launch took it over")
    if locks.is_held(lock):
        return None
    what = "run marker" if lock.name.startswith(".live-") else "lock"
    if locks.holder_is_dead(lock):
        return candidate(lock, f"{what} of {locks.holder(lock)}, which has exited")
    age = time.time() - lock.stat().st_mtime
    return candidate(lock, f"{what} of {locks.holder(lock)}, no heartbeat for {age:.0f} s")


def resume_state(partial: Path) -> str:
    """What a rerun of the same config continues from in an unpublished step's working directory
    (the cases dag.why_run tells apart)."""
    if artifacts.finished_training(partial):
        return "kept: a finished training that a rerun of the same config publishes"
    if (partial / "checkpoints").exists():
        return "kept: checkpoints a rerun of the same config resumes from"
    if units.progress(partial):
        return "kept: finished work units a rerun of the same config reuses"
    return "kept: an unfinished attempt's working directory, which a rerun of the same config continues in"


def work_dir_leftover(path: Path, kind: str, fingerprint: str) -> Candidate:
    guards = step_guards(path.parent, fingerprint)
    if who := live_holder(guards):
        return candidate(path, f"kept: {who} is running this step", keep=True)
    if kind == "staging":
        return candidate(path, "staging directory of an attempt that did not finish", guards=guards)
    if (path.parent / fingerprint / artifacts.MANIFEST).exists():
        return candidate(path, "working directory of a step published since: nothing reads it again", guards=guards)
    return candidate(path, resume_state(path), keep=True)


def step_entry_leftover(entry: Path) -> Candidate | None:
    """One entry of a step's directory: a lock, a staging or working directory, an unfinished result."""
    if STEP_LOCK.fullmatch(entry.name) or MOVED_ASIDE.fullmatch(entry.name):
        return lock_leftover(entry)
    if match := WORK_DIR.fullmatch(entry.name):
        return work_dir_leftover(entry, *match.groups())
    if not re.fullmatch(FINGERPRINT, entry.name) or (entry / artifacts.MANIFEST).exists():
        return None  # a published result, or not the pipeline's
    guards = step_guards(entry.parent, entry.name)
    if live_holder(guards):
        return None
    return candidate(entry, f"no {artifacts.MANIFEST}: an attempt that never finished, never a result", guards=guards)


def train_run_leftover(run_dir: Path) -> Candidate | None:
    """Ray Train's directory of one training attempt (its storage_path is <root>/.ray_train)."""
    step = artifacts.train_run_step(run_dir.name)
    if step is None:  # not an attempt's directory
        return None
    guards = step_guards(run_dir.parent.parent / step[0], step[1])
    if who := live_holder(guards):
        return candidate(run_dir, f"kept: {who} is running this step", keep=True)
    return candidate(run_dir, "Ray Train's directory of an attempt that ended: nothing reads it again", guards=guards)


def entries(root: Path) -> Iterator[tuple[Path, Callable[[Path], Candidate | None]]]:
    """What gc looks at, each with how to judge it."""
    for step_dir in sorted(root.iterdir()):
        if step_dir.is_dir() and not step_dir.name.startswith(".") and step_dir.name not in NOT_STEPS:
            yield from ((entry, step_entry_leftover) for entry in sorted(step_dir.iterdir()))
    yield from ((run_dir, train_run_leftover) for run_dir in sorted((root / artifacts.TRAIN_RUNS).glob("*")))
    yield from ((marker, lock_leftover) for marker in sorted((root / "runs").glob(".live-*")))


def find(root: Path) -> Iterator[Candidate]:
    """Everything gc would remove, and what it keeps that looks like a leftover (with why)."""
    for path, judge in entries(root):
        try:
            found = judge(path)
        except FileNotFoundError:  # gone while it was looked at: a launch finished with it
            continue
        if found:
            yield found


def remove(item: Candidate) -> bool:
    """Removes it unless a launch took one of its locks since it was found."""
    if live_holder(item.guards):
        return False
    if item.path.is_dir():
        shutil.rmtree(item.path, ignore_errors=True)
    else:
        item.path.unlink(missing_ok=True)
    return True


def megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def collect(root: Path, delete: bool, older_than_h: float | None) -> None:
    """List what would be removed (and what is kept, with why); remove it with `delete`."""
    cutoff = time.time() - older_than_h * 3600 if older_than_h is not None else float("inf")
    garbage = []
    for item in find(root):
        if item.changed_at > cutoff:
            continue
        print(f"{'keep' if item.keep else 'remove':<6} {megabytes(item.num_bytes):>9}  "
              f"{item.path.relative_to(root)}  {item.reason}")
        garbage += [] if item.keep else [item]
    total = megabytes(sum(item.num_bytes for item in garbage))
    if not garbage:
        print(f"nothing to remove under {root}")
    elif not delete:
        print(f"{len(garbage)} items, {total}: rerun with --delete to remove them")
    else:
        removed = [item for item in garbage if remove(item)]
        for item in garbage:
            if item not in removed:
                print(f"skipped {item.path.relative_to(root)}: a launch took its lock meanwhile")
        print(f"removed {len(removed)} items, {megabytes(sum(item.num_bytes for item in removed))}")


def local_root(given: str) -> Path:
    """The folder gc cleans: the root, or for an object-store root this machine's working copy."""
    if not store_module.is_uri(given):
        return Path(given).resolve()
    root = store_module.cache_root("")
    print(f"note: {given} is an object store: gc cleans only this machine's working copy {root} "
          f"($LMFORGE_CACHE; give another paths.cache as --root), never the store")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.gc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.environ.get("LMFORGE_ROOT", "lmforge_runs"), help="paths.root of the runs")
    parser.add_argument("--delete", action="store_true", help="remove what is listed (default: only list it)")
    parser.add_argument("--older-than", type=float, default=None, metavar="HOURS",
                        help="keep what changed within the last HOURS hours")
    args = parser.parse_args(argv)
    root = local_root(args.root)
    if not root.is_dir():
        print(f"error: --root {root} is not a folder of runs (no such folder); give the paths.root your "
              f"runs used, or set $LMFORGE_ROOT", file=sys.stderr)
        return 2
    collect(root, args.delete, args.older_than)
    return 0


if __name__ == "__main__":
    sys.exit(main())
