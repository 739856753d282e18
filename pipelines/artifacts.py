"""Step output directories: atomic publication and the manifest that makes a directory a result.

A step writes into `<root>/<step>/.staging-<fingerprint>-<id>/`; when it succeeds the manifest
(config, fingerprint, inputs, every file with size and SHA-256, metrics, code version, timings)
is written into it last and the directory is renamed to `<root>/<step>/<fingerprint>/`.
A directory without a valid manifest is never taken as a result.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from tasks.common import files_problem, record_files, write_json

MANIFEST = "_manifest.json"
TRAIN_METRICS = ".train_metrics.json"
"""Written by a training step's rank 0 when training (and export) finished, before publication."""
CODE_VERSION_ENV = "LMFORGE_CODE_VERSION"
TRAIN_RUNS = ".ray_train"
"""Ray Train's storage_path under the root: one directory per training attempt (train_run_name)."""


def step_dir(root: Path, step: str, fingerprint: str) -> Path:
    return root / step / fingerprint


def staging_dir(root: Path, step: str, fingerprint: str) -> Path:
    """A fresh staging directory. Called under the step's lock, so staging directories of the same
    fingerprint are leftovers of a killed attempt: they are removed."""
    for leftover in (root / step).glob(f".staging-{fingerprint}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    path = root / step / f".staging-{fingerprint}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def partial_dir(root: Path, step: str, fingerprint: str) -> Path:
    """A step's working directory: fixed per fingerprint, so a rerun after a crash finds what the
    previous attempt left there (a training step's checkpoints, the ingest step's finished work
    units) and continues from it. Removed once the step's result is published."""
    return root / step / f".partial-{fingerprint}"


def train_run_name(step_name: str, fingerprint: str) -> str:
    """Ray Train's name for one attempt at a training step: its directory under TRAIN_RUNS. Unique per
    attempt, so no later attempt reads it (a step resumes from its own checkpoints in partial_dir)."""
    return f"{step_name}-{fingerprint}-{uuid.uuid4().hex[:6]}"


def train_run_step(name: str) -> tuple[str, str] | None:
    """(step, fingerprint) of a train_run_name; a branch ('finetune.lora') as its step's directory name."""
    parts = name.rsplit("-", 2)
    return (parts[0].split(".")[0], parts[1]) if len(parts) == 3 else None


def remove_train_runs(root: Path, step: str, fingerprint: str) -> None:
    """Ray Train's directories of every attempt at a step, once it is published (under its lock)."""
    for run_dir in (root / TRAIN_RUNS).glob(f"*-{fingerprint}-*"):
        if train_run_step(run_dir.name) == (step, fingerprint):
            shutil.rmtree(run_dir, ignore_errors=True)


def finished_training(partial: Path) -> dict | None:
    """What a training attempt reported when it finished, if its driver died before publishing
    the result (None when it did not finish, or stopped on request to be continued)."""
    try:
        reported = json.loads((partial / TRAIN_METRICS).read_text())
    except (OSError, ValueError):
        return None
    return None if "stopped_at_step" in reported.get("metrics", {}) else reported


def code_version() -> str:
    """The git commit of the project (with '+dirty' for uncommitted changes), or 'unknown'.
    $LMFORGE_CODE_VERSION wins: a submitted job runs a copy without .git (pipelines/submit.py sets it)."""
    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's content (without this digest): an edited manifest is detected."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def seal(staging: Path, manifest: dict) -> dict:
    """The manifest of a complete staging directory (every file with size and SHA-256, and the
    digest over all of it), written into the directory last."""
    manifest = {**manifest, "files": record_files(staging, skip=MANIFEST)}
    manifest = json.loads(json.dumps(manifest, default=str))  # the digest covers what is written
    manifest["digest"] = manifest_digest(manifest)
    write_json(staging / MANIFEST, manifest)
    return manifest


def publish(staging: Path, final: Path, manifest: dict) -> dict:
    """Write the manifest last, then move the finished directory into place."""
    manifest = seal(staging, manifest)
    install(staging, final)
    return manifest


def install(staging: Path, final: Path) -> None:
    """A complete staging directory, its manifest written last, renamed into place."""
    if final.exists():  # a directory left by an attempt that never wrote its manifest
        shutil.rmtree(final)
    staging.rename(final)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a finished step, or None when the directory is not a complete result."""
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def damage(directory: Path, manifest: dict) -> str | None:
    """What is wrong with a published step directory, judged by its manifest; None if intact."""
    if manifest.get("digest") != manifest_digest(manifest):
        return f"{MANIFEST} was edited (its digest does not match)"
    return files_problem(directory, manifest.get("files", {}))


def previous_manifests(root: Path, step: str) -> list[dict]:
    """Manifests of earlier runs of a step, newest first."""
    found = [m for m in (read_manifest(d) for d in (root / step).glob("*") if not d.name.startswith(".")) if m]
    return sorted(found, key=lambda m: m.get("finished_at", 0), reverse=True)
