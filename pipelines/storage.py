"""Where a step's results live and how they move; the only module that knows the storage mode.

- `SharedRoot`: paths.root is a directory every Ray node sees. A step writes into a staging directory
  (a training step into its working directory) renamed into `<root>/<step>/<fingerprint>/` with its
  manifest written last; with `paths.store` every result is also uploaded to a step store, and the
  steps cached only there are downloaded (pipelines/store.py).
- `ObjectStoreRoot`: paths.root is a URI, the only place the nodes share. Each node works in its own
  copy (paths.cache, or $LMFORGE_CACHE on the node): it fetches a step's inputs there, publishes the
  result to the store, and keeps there what must survive a failed attempt (checkpoints, finished work
  units: store.NodeMirror).

The driver asks its `Storage` for a step's cached result, its lock, what MLflow shows of it and where
it lives. The Ray task or Train worker that runs a step gets the step's `Attempt` (picklable: it
travels there), which fetches the inputs onto its node, gives the directories to write in, the task's
Mirror and StopChannel (tasks/common.py), and seals and publishes the result. A training step's stop
request and its owner token are files in its working directory (`StopFiles`); where the nodes share
no directory the driver's stop request reaches rank 0 through the store.

    storage = open_storage(cfg.paths);  attempt = storage.attempt(planned step, manifest so far)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from conf.schema import PathsConfig, usable_folder
from pipelines import artifacts, locks
from pipelines import store as store_module
from pipelines.dag import PlannedStep
from pipelines.redaction import redact_text
from tasks.common import Mirror, SharedFolder, UserError, write_atomic, write_json

STOP_FILE = ".stop_requested"
"""In a training step's working directory: the driver asks the workers to checkpoint and stop."""
OWNER_FILE = ".owner"
"""In a training step's working directory: the launch that owns it now. A rank that sees it change (a
new launch took over after this attempt's driver was killed) stops without writing."""


def owner(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


class StopFiles:
    """The StopChannel (tasks/common.py) of a training step's working directory: a stop request is
    STOP_FILE there, a takeover OWNER_FILE no longer naming this launch's `token`."""

    def __init__(self, work_dir: Path, token: str | None = None):
        self.stop_file, self.owner_file = Path(work_dir) / STOP_FILE, Path(work_dir) / OWNER_FILE
        self.token = owner(self.owner_file) if token is None else token

    def request(self) -> None:
        self.stop_file.touch()

    def requested(self) -> bool:
        return self.stop_file.exists()

    def superseded(self) -> bool:
        return owner(self.owner_file) != self.token


def finished(base: dict, inputs: dict, metrics: dict, node_ids: list) -> dict:
    """A step's manifest (before sealing) once it has finished."""
    return {**base, "inputs": inputs, "metrics": metrics, "finished_at": time.time(),
            "seconds": time.time() - base["started_at"],
            "placement": {"node_ids": node_ids}}  # where it ran (Ray node ids); not part of the result


@dataclass
class Place:
    """Where one attempt at a step works on the node that runs it."""

    inputs: dict[str, Path]
    staging: Path
    """Where the step writes its result (a training step: its working directory)."""
    work_dir: Path
    """What must survive a failed attempt (finished work units, checkpoints): fixed per fingerprint."""
    mirror: Mirror
    section: object = None
    """The step's config section, its paths into the driver's copy made this node's."""
    pinned: bool = False
    """The step's directories are on this node alone: its parallel tasks run here too."""


@dataclass(frozen=True)
class Attempt:
    """One attempt at a step, as the Ray task or Train worker that runs it (and the driver) sees it."""

    step: str
    fingerprint: str
    upstream: dict
    base: dict
    """The step's manifest so far (config, fingerprint, start time)."""
    token: str
    """This launch's claim on a training step's working directory (OWNER_FILE)."""


@dataclass
class Storage:
    """The driver's view: the local root (a shared root, or this machine's working copy) and, for the
    planner, the store whose steps count as cached."""

    root: Path
    step_store: store_module.Store | None

    def reuse(self, item: PlannedStep, say: Callable[[str], None]) -> dict:
        """The manifest of a step the plan found cached."""
        say(f"cached ({item.fingerprint})")
        return artifacts.read_manifest(item.out_dir)

    def lock(self, item: PlannedStep, say: Callable[[str], None]):
        """The step's lock, held while this launch runs it: launches sharing the root run it once."""
        return locks.step_lock(locks.lock_path(self.root, item.step.base, item.fingerprint), say)

    def attempt(self, item: PlannedStep, base: dict, token: str) -> Attempt:
        raise NotImplementedError

    def disk_of(self, item: PlannedStep) -> Path:
        """Where a failed step wrote here (is its disk full?)."""
        return artifacts.partial_dir(self.root, item.step.base, item.fingerprint)


class SharedRoot(Storage):
    """paths.root every node sees, and optionally the step store of paths.store."""

    def reuse(self, item: PlannedStep, say: Callable[[str], None]) -> dict:
        if not item.in_store:
            return super().reuse(item, say)
        with self.lock(item, say):
            manifest = self.step_store.pull(item.step.base, item.fingerprint, self.root)
        say(f"cached ({item.fingerprint}), downloaded from the step store")
        return manifest

    def finished_meanwhile(self, item: PlannedStep) -> dict | None:
        manifest = artifacts.read_manifest(item.out_dir)
        return manifest if manifest and not artifacts.damage(item.out_dir, manifest) else None

    def keep(self, item: PlannedStep, manifest: dict, ran: bool, say: Callable[[str], None]) -> None:
        """A result the step store lacks, uploaded to it."""
        if self.step_store is not None and not item.in_store and self.step_store.push(item.out_dir, manifest):
            say(f"uploaded to the step store {redact_text(self.step_store.uri)}")

    @contextlib.contextmanager
    def review(self, item: PlannedStep, manifest: dict, names: list[str]) -> Iterator[Path]:
        yield item.out_dir

    def location(self, item: PlannedStep) -> str:
        return str(item.out_dir)

    def local_step(self, step: str, fingerprint: str) -> Path:
        return artifacts.step_dir(self.root, step, fingerprint)

    def keep_summary(self, run_id: str, summary: dict) -> None:
        return None  # runs/<run id>.json is already below the shared root

    def attempt(self, item: PlannedStep, base: dict, token: str) -> Attempt:
        return SharedAttempt(item.step.base, item.fingerprint, item.upstream, base, token, self.root)


@dataclass
class ObjectStoreRoot(Storage):
    """paths.root a URI: the store is the root, and each node (this one too) works in its own copy."""

    store_uri: str = ""
    cache: str = ""

    def reuse(self, item: PlannedStep, say: Callable[[str], None]) -> dict:
        if not item.in_store:
            return super().reuse(item, say)
        say(f"cached ({item.fingerprint}) in {redact_text(self.step_store.uri)}")
        return self.step_store.manifest(item.step.base, item.fingerprint)

    def finished_meanwhile(self, item: PlannedStep) -> dict | None:
        return self.step_store.manifest(item.step.base, item.fingerprint)

    def keep(self, item: PlannedStep, manifest: dict, ran: bool, say: Callable[[str], None]) -> None:
        """A result found in this working copy only, uploaded (what ran was published by its node)."""
        if not ran and not item.in_store and self.step_store.push(item.out_dir, manifest):
            say(f"uploaded to the step store {redact_text(self.step_store.uri)}")

    @contextlib.contextmanager
    def review(self, item: PlannedStep, manifest: dict, names: list[str]) -> Iterator[Path]:
        """The step's directory here, or (its files are on another node) copies of `names` from the store."""
        if artifacts.read_manifest(item.out_dir):
            yield item.out_dir
            return
        with tempfile.TemporaryDirectory(prefix="lmforge-review-") as fetched:
            self.step_store.fetch(manifest, names, Path(fetched))
            yield Path(fetched)

    def location(self, item: PlannedStep) -> str:
        return self.step_store.location(item.step.base, item.fingerprint)

    def local_step(self, step: str, fingerprint: str) -> Path:
        """A stored step in this working copy (fetched first)."""
        return store_module.fetch_steps(self.step_store, self.root, {step: fingerprint})[step]

    def keep_summary(self, run_id: str, summary: dict) -> None:
        """Where `pipelines.status --root <the URI>` finds it."""
        self.step_store.put_json(f"runs/{run_id}.json", summary)

    def attempt(self, item: PlannedStep, base: dict, token: str) -> Attempt:
        return NodeAttempt(item.step.base, item.fingerprint, item.upstream, base, token, self.store_uri, self.cache,
                           str(self.root))


def check_root(paths: PathsConfig) -> None:
    """Before anything is made: a local paths.root this user cannot write to stops the run."""
    if not store_module.is_uri(paths.root) and not usable_folder(paths.root):
        raise UserError(f"paths.root: '{paths.root}' is not writable here; give a folder this user can write to")


def open_storage(paths: PathsConfig) -> Storage:
    """The storage of paths.root (and paths.store, paths.cache); UserError naming the key when a store
    cannot be used."""
    if not store_module.is_uri(paths.root):
        return SharedRoot(Path(paths.root).resolve(), store_module.open_store(paths.store))
    return ObjectStoreRoot(store_module.cache_root(paths.cache), store_module.open_store(paths.root, "paths.root"),
                           paths.root, paths.cache)



@dataclass(frozen=True)
class SharedAttempt(Attempt):
    """An attempt on a root every node sees: the driver publishes a training step, the task a data step."""

    root: Path = Path()

    def _inputs(self) -> dict[str, Path]:
        return {dep: artifacts.step_dir(self.root, dep, fp) for dep, fp in self.upstream.items()}

    @contextlib.contextmanager
    def data(self, section, say: Callable[[str], None]) -> Iterator[Place]:
        """A data step's place (under the driver's lock on the step); its staging goes when it ends."""
        staging = artifacts.staging_dir(self.root, self.step, self.fingerprint)
        work_dir = artifacts.partial_dir(self.root, self.step, self.fingerprint)
        try:
            yield Place(self._inputs(), staging, work_dir, SharedFolder(), section)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, place: Place, metrics: dict, node_ids: list) -> dict:
        """Seal the staging directory, rename it into place, drop the working directory."""
        manifest = artifacts.publish(place.staging, artifacts.step_dir(self.root, self.step, self.fingerprint),
                                     finished(self.base, place.inputs, metrics, node_ids))
        shutil.rmtree(place.work_dir, ignore_errors=True)  # a data step's finished work units (a training step's moved)
        return manifest

    @contextlib.contextmanager
    def training(self, rank: int, say: Callable[[str], None]) -> Iterator[tuple[Place, StopFiles]]:
        """A training worker's place (made by `fit`) and stop channel."""
        work_dir = artifacts.partial_dir(self.root, self.step, self.fingerprint)
        yield Place(self._inputs(), work_dir, work_dir, SharedFolder()), StopFiles(work_dir, self.token)

    def report(self, place: Place, metrics: dict, node_id: str) -> None:
        """Rank 0's outcome, for the driver (Ray Train keeps reported metrics only with checkpoints),
        unless another launch has taken the step over since (this attempt's driver was killed)."""
        if owner(place.work_dir / OWNER_FILE) == self.token:
            write_json(place.work_dir / artifacts.TRAIN_METRICS, {"metrics": metrics, "node_id": node_id})

    def fit(self, train: Callable[[Callable[[], None]], None]) -> dict:
        """Run `train(request_stop)` unless an earlier attempt finished training (its driver was killed
        before publishing); what rank 0 reported."""
        work_dir = artifacts.partial_dir(self.root, self.step, self.fingerprint)
        work_dir.mkdir(parents=True, exist_ok=True)
        reported = artifacts.finished_training(work_dir)
        if reported is None:
            (work_dir / STOP_FILE).unlink(missing_ok=True)  # a request of an earlier, stopped attempt
            # Workers of an attempt whose driver was killed may still run for a few seconds: the
            # owner file tells them they were replaced, so they stop writing.
            (work_dir / OWNER_FILE).write_text(self.token)
            train((work_dir / STOP_FILE).touch)
            (work_dir / STOP_FILE).unlink(missing_ok=True)
            reported = json.loads((work_dir / artifacts.TRAIN_METRICS).read_text())
        (work_dir / OWNER_FILE).unlink(missing_ok=True)
        (work_dir / artifacts.TRAIN_METRICS).unlink()
        return reported

    def publish_training(self, reported: dict) -> dict:
        work_dir = artifacts.partial_dir(self.root, self.step, self.fingerprint)
        place = Place(self._inputs(), work_dir, work_dir, SharedFolder())
        return self.publish(place, reported["metrics"], [reported["node_id"]])


@dataclass(frozen=True)
class NodeAttempt(Attempt):
    """An attempt where the nodes share only the store: the node that runs the step fetches its inputs,
    works in its own copy, and publishes the result to the store."""

    store_uri: str = ""
    cache: str = ""
    driver_root: str = ""

    def here(self) -> tuple[Path, store_module.Store]:
        """This node's working copy and the store."""
        return store_module.cache_root(self.cache), store_module.root_store(self.store_uri)

    def _names(self) -> tuple[str, str]:
        """The store's objects of rank 0's outcome and of the driver's stop request."""
        return tuple(f"{self.step}/.partial-{self.fingerprint}/{name}" for name in (artifacts.TRAIN_METRICS, STOP_FILE))

    @contextlib.contextmanager
    def data(self, section, say: Callable[[str], None]) -> Iterator[Place]:
        """A data step's place on this node, under the node's own lock on the step."""
        root, store = self.here()
        inputs = store_module.fetch_steps(store, root, self.upstream, say)
        section = relocate(section, self.driver_root, lambda step, fp: store_module.fetch_steps(store, root, {step: fp}, say)[step])
        with locks.step_lock(locks.lock_path(root, self.step, self.fingerprint, "node"), say):
            staging = artifacts.staging_dir(root, self.step, self.fingerprint)
            work_dir = artifacts.partial_dir(root, self.step, self.fingerprint)
            try:
                yield Place(inputs, staging, work_dir, store_module.NodeMirror(self.store_uri, str(root)), section, True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def publish(self, place: Place, metrics: dict, node_ids: list) -> dict:
        """Seal and upload the result (the manifest last), keep it in this node's copy, drop the working
        directory here and in the store."""
        root, store = self.here()
        manifest = store_module.publish(place.staging, root, store, finished(self.base, place.inputs, metrics, node_ids))
        shutil.rmtree(place.work_dir, ignore_errors=True)
        store.delete_dir(f"{self.step}/{place.work_dir.name}")
        return manifest

    @contextlib.contextmanager
    def training(self, rank: int, say: Callable[[str], None]) -> Iterator[tuple[Place, StopFiles]]:
        """A training worker's place on this node (inputs fetched, this launch's owner token written: it
        fences this node's old workers) and stop channel; rank 0 watches the store for the driver's stop request."""
        root, store = self.here()
        inputs = store_module.fetch_steps(store, root, self.upstream, say)
        work_dir = artifacts.partial_dir(root, self.step, self.fingerprint)
        work_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(work_dir / OWNER_FILE, lambda fh: fh.write(self.token.encode()))
        end_watch = watch_stop_request(store, self._names()[1], work_dir / STOP_FILE) if rank == 0 else (lambda: None)
        try:
            yield (Place(inputs, work_dir, work_dir, store_module.NodeMirror(self.store_uri, str(root))),
                   StopFiles(work_dir, self.token))
        finally:
            end_watch()

    def report(self, place: Place, metrics: dict, node_id: str) -> None:
        """Rank 0 publishes a finished step and hands its outcome to the driver through the store, unless
        another launch has taken the step over since."""
        if owner(place.work_dir / OWNER_FILE) != self.token:
            return
        root, store = self.here()
        if "stopped_at_step" not in metrics:
            for leftover in (OWNER_FILE, STOP_FILE):
                (place.work_dir / leftover).unlink(missing_ok=True)
            store_module.publish(place.work_dir, root, store, finished(self.base, place.inputs, metrics, [node_id]))
        store.put_json(self._names()[0], {"metrics": metrics, "node_id": node_id})

    def fit(self, train: Callable[[Callable[[], None]], None]) -> dict:
        """Run `train(request_stop)`: a stop request and rank 0's report go through the store."""
        store = self.here()[1]
        outcome_name, stop_name = self._names()
        for name in (stop_name, outcome_name):  # left by an earlier, stopped attempt
            store.delete(name)
        train(lambda: store.put_json(stop_name, {"requested_at": time.time()}))
        reported = store.get_json(outcome_name)
        for name in (stop_name, outcome_name):
            store.delete(name)
        if reported is None:
            raise RuntimeError(f"training ended without rank 0's report ({store.uri}/{outcome_name})")
        if "stopped_at_step" not in reported["metrics"]:  # published: its checkpoints are no longer needed
            store.delete_dir(outcome_name.rsplit("/", 1)[0])
        return reported

    def publish_training(self, reported: dict) -> dict:
        """Published by rank 0 on its node."""
        return self.here()[1].manifest(self.step, self.fingerprint)


STOP_POLL_S = 1.0  # one small read of the store per second


def watch_stop_request(store: store_module.Store, stop_name: str, stop_file: Path) -> Callable[[], None]:
    """Rank 0 mirrors the driver's stop request from the store into its own directory; the ranks
    agree on it through the all-reduce they already do (tasks/training.py). Returns the watch's end."""
    done = threading.Event()

    def watch():
        while not done.wait(STOP_POLL_S):
            if store.get_json(stop_name) is not None:
                with contextlib.suppress(OSError):  # the step may have just finished
                    stop_file.touch()

    threading.Thread(target=watch, name="stop request", daemon=True).start()
    return done.set


STEP_DIR = re.compile(r"[^/]+/[0-9a-f]{16}")


def relocate(section, driver_root: str, fetch: Callable[[str, str], Path]):
    """A config section whose placement fields (set by the planner, kept out of the fingerprint) name
    step directories of the driver's working copy (`<driver root>/<step>/<fingerprint>`), with those
    fetched onto this node and named by their place here."""
    def here(value):
        if isinstance(value, dict):
            return {key: here(item) for key, item in value.items()}
        if isinstance(value, str) and value.startswith(driver_root.rstrip("/") + "/"):
            relative = value[len(driver_root.rstrip("/")) + 1:]
            if STEP_DIR.fullmatch(relative):
                return str(fetch(*relative.split("/")))
        return value

    fields = [f.name for f in dataclasses.fields(section) if f.metadata.get("placement")]
    changes = {name: here(getattr(section, name)) for name in fields}
    changes = {name: value for name, value in changes.items() if value != getattr(section, name)}
    return dataclasses.replace(section, **changes) if changes else section
