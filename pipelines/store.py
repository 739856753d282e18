"""The step store: step directories in an object store or any other pyarrow.fs location
(s3://bucket/prefix, gs://..., hdfs://..., file:///...). Two uses:

- `paths.store`: a copy of every published step beside a local or shared `paths.root`. A run on
  another machine, or on a fresh ephemeral cluster, finds its finished steps there and downloads
  them instead of computing them again; the store outlives the cluster.
- `paths.root` itself a URI: the store is the only place the nodes share. Each node keeps its own
  working copy (`cache_root`): a step fetches its inputs from the store onto the node it runs on
  (`fetch_steps`), writes there, and uploads its result (`publish`); what must outlive the node goes
  through `NodeMirror`. pipelines/storage.py decides which of these a run uses.

The layout is the local one: `<store>/<step>/<fingerprint>/`. Uploads put every file first and
the manifest last: object stores write single objects atomically, so a step without its manifest
is never taken as a result, exactly as on disk. Downloads are checked against the manifest's
sizes and SHA-256 before they are renamed into place.

    open_store(uri) -> Store | None;  store.manifest(step, fp);  store.push(step_dir);  store.pull(step, fp, root)
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from conf.schema import cache_dir
from pipelines import artifacts, locks
from tasks.common import UserError, files_problem, filesystem, first_line, write_atomic, write_json

BLOCK = 1 << 20


def copy_up(fs: pafs.FileSystem, file: Path, target: str) -> None:
    """A local file to the store (its folder made first)."""
    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    with open(file, "rb") as source, fs.open_output_stream(target) as sink:
        shutil.copyfileobj(source, sink, BLOCK)


def copy_down(fs: pafs.FileSystem, source_key: str, file: Path) -> None:
    """A stored file to a local one, replaced whole (a reader never sees half of it)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(source_key) as source:
        write_atomic(file, lambda sink: shutil.copyfileobj(source, sink, BLOCK))


def is_uri(path: str) -> bool:
    return "://" in path


def cache_root(configured: str) -> Path:
    """This node's working copy of the step directories when paths.root is a URI."""
    return Path(cache_dir(configured)).resolve()


@dataclass
class Store:
    uri: str
    fs: pafs.FileSystem
    base: str

    def path(self, step: str, fingerprint: str, name: str = "") -> str:
        return self.key(step, fingerprint, name)

    def key(self, *parts: str) -> str:
        """Where a relative name lies in the store."""
        return "/".join(part for part in (self.base.rstrip("/"), *parts) if part)

    def location(self, step: str, fingerprint: str) -> str:
        """The stored step's address as a user would type it."""
        return f"{self.uri.rstrip('/')}/{step}/{fingerprint}"

    def put_json(self, name: str, payload) -> None:
        """A small object below the store's base (a training outcome, a stop request, a run summary)."""
        target = self.key(name)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(target) as sink:
            sink.write(json.dumps(payload, indent=2, sort_keys=True, default=str).encode("utf-8"))

    def get_json(self, name: str):
        """put_json's object, or None when there is none (or it is unreadable)."""
        try:
            with self.fs.open_input_stream(self.key(name)) as stream:
                return json.loads(stream.read())
        except (FileNotFoundError, OSError, pa.ArrowException, ValueError):
            return None

    def summaries(self) -> list[tuple[dict, float]]:
        """The run summaries launches put under `runs/`, with their modification times."""
        found = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.key("runs"), allow_not_found=True)):
            summary = self.get_json(f"runs/{info.base_name}") if info.base_name.endswith(".json") else None
            if isinstance(summary, dict):
                found.append((summary, info.mtime.timestamp() if info.mtime else 0.0))
        return found

    def delete(self, name: str) -> None:
        """A stored file, if it is there."""
        with contextlib.suppress(FileNotFoundError, OSError, pa.ArrowException):
            self.fs.delete_file(self.key(name))

    def delete_dir(self, name: str) -> None:
        """A stored folder and all below it, if it is there."""
        with contextlib.suppress(FileNotFoundError, OSError, pa.ArrowException):
            self.fs.delete_dir(self.key(name))

    def fetch(self, manifest: dict, names: list[str], directory: Path) -> None:
        """Copies of some of a stored step's files (those its manifest lists) in `directory`: what
        the driver shows in MLflow, without downloading the whole step."""
        for name in names:
            if name == artifacts.MANIFEST or name in manifest["files"]:
                copy_down(self.fs, self.path(manifest["step"], manifest["fingerprint"], name), directory / name)

    def manifest(self, step: str, fingerprint: str) -> dict | None:
        """The stored step's manifest if it is complete and unedited, else None."""
        try:
            with self.fs.open_input_stream(self.path(step, fingerprint, artifacts.MANIFEST)) as stream:
                manifest = json.loads(stream.read())
        except (FileNotFoundError, OSError, pa.ArrowException, ValueError):
            return None
        return manifest if manifest.get("digest") == artifacts.manifest_digest(manifest) else None

    def push(self, step_dir: Path, manifest: dict) -> bool:
        """Upload a published step (files, then the manifest); False when the store already has it."""
        step, fingerprint = manifest["step"], manifest["fingerprint"]
        stored = self.manifest(step, fingerprint)
        if stored and stored["digest"] == manifest["digest"]:
            return False
        self.fs.create_dir(self.path(step, fingerprint), recursive=True)
        for name in [*manifest["files"], artifacts.MANIFEST]:
            copy_up(self.fs, step_dir / name, self.path(step, fingerprint, name))
        return True

    def pull(self, step: str, fingerprint: str, root: Path, manifest: dict | None = None) -> dict:
        """Download a stored step into `<root>/<step>/<fingerprint>/` (staged, checked, renamed);
        `manifest`: its stored manifest, when the caller has just read it."""
        manifest = manifest or self.manifest(step, fingerprint)
        if manifest is None:
            raise UserError(f"paths.store: {self.path(step, fingerprint)} has no complete step")
        staging = artifacts.staging_dir(root, step, fingerprint)  # under the step's lock (the executor's)
        try:
            for name in manifest["files"]:
                copy_down(self.fs, self.path(step, fingerprint, name), staging / name)
            problem = files_problem(staging, manifest["files"])
            if problem:
                raise UserError(f"paths.store: the stored {step} {fingerprint} is damaged ({problem}); "
                                f"delete {self.path(step, fingerprint)} or rerun without paths.store")
            write_json(staging / artifacts.MANIFEST, manifest)
            artifacts.install(staging, artifacts.step_dir(root, step, fingerprint))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest


def open_store(uri: str, key: str = "paths.store") -> Store | None:
    """The store at `uri` (None when unset); UserError naming the config key when it cannot be used."""
    if not uri:
        return None
    if not is_uri(uri):
        raise UserError(f"{key}: '{uri}' is not a URI (s3://bucket/prefix, gs://..., file:///abs/path)")
    try:
        fs, base = filesystem(uri)
        fs.get_file_info(base)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot use {uri} ({first_line(exc)})") from None
    return Store(uri, fs, base)


def fetch_steps(store: Store, root: Path, wanted: dict[str, str], say=print) -> dict[str, Path]:
    """Each wanted step (name -> fingerprint) as a directory under this node's `root`, downloaded
    from the store unless the node already holds the stored version. Under the step's lock on this
    node: the ranks of a training job that share a node download once."""
    found = {}
    for step, fingerprint in wanted.items():
        directory = artifacts.step_dir(root, step, fingerprint)
        stored = store.manifest(step, fingerprint)
        if stored is None:
            raise UserError(f"paths.root: {store.location(step, fingerprint)} has no complete step")
        local = artifacts.read_manifest(directory)
        if not (local and local.get("digest") == stored["digest"]):
            (root / step).mkdir(parents=True, exist_ok=True)
            with locks.step_lock(locks.lock_path(root, step, fingerprint, "fetch"), say):
                local = artifacts.read_manifest(directory)
                if not (local and local.get("digest") == stored["digest"]):
                    store.pull(step, fingerprint, root, stored)
                    say(f"fetched {step} {fingerprint} from {store.uri}")
        found[step] = directory
    return found


def publish(staging: Path, root: Path, store: Store, manifest: dict) -> dict:
    """Where paths.root is a URI, on the node that holds the result: seal it, upload it (the
    manifest last), then keep it in this node's working copy."""
    manifest = artifacts.seal(staging, manifest)
    store.push(staging, manifest)
    artifacts.install(staging, artifacts.step_dir(root, manifest["step"], manifest["fingerprint"]))
    return manifest


def _skipped(parts, exclude: tuple[str, ...]) -> bool:
    """Dot-files (a launch's owner token, a stop request) and excluded sub-folders stay on the node."""
    return any(part.startswith(".") or part in exclude for part in parts)


@functools.lru_cache(maxsize=4)
def root_store(uri: str) -> Store:
    """The store of a URI paths.root, opened once per process (each open asks the store)."""
    return open_store(uri, "paths.root")


@dataclass(frozen=True)
class NodeMirror:
    """What must outlive a node, where nodes share no directory: a training step's checkpoints
    (each node uploads the shards of its own ranks), loss history and best weights
    (tasks/checkpoints.py calls it). A local path below `root` maps to the same place in the store."""
    store_uri: str
    root: str

    def tends(self, rank: int) -> bool:
        """Each node's first rank looks after the node's own copy."""
        return int(os.environ.get("LOCAL_RANK", "0")) == 0

    def drop_unkept(self, path: Path, kept: list[str], pattern: str) -> None:
        for local in Path(path).glob(pattern):
            if local.name not in kept:
                shutil.rmtree(local, ignore_errors=True)

    def _key(self, path: Path) -> str:
        store = root_store(self.store_uri)
        return "/".join([store.base.rstrip("/"), *Path(path).resolve().relative_to(Path(self.root).resolve()).parts])

    def _listing(self, path: Path) -> dict[str, int]:
        """The store's files below `path`: relative name -> size."""
        store, key = root_store(self.store_uri), self._key(path)
        infos = store.fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
        return {info.path[len(key) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}

    def upload(self, path: Path, exclude: tuple[str, ...] = (), replace: bool = True) -> None:
        """A file, or the files below a folder (not dot-files, nor below `exclude`d sub-folders).
        replace=False keeps stored files of the same size (checkpoint shards never change);
        replace=True also removes stored files that are gone here."""
        fs, path = root_store(self.store_uri).fs, Path(path)
        if path.is_file():
            local, stored = {"": path}, {}
        else:
            local = {f.relative_to(path).as_posix(): f for f in sorted(path.rglob("*"))
                     if f.is_file() and not _skipped(f.relative_to(path).parts, exclude)}
            stored = self._listing(path)
        for name, file in local.items():
            if replace or stored.get(name) != file.stat().st_size:
                copy_up(fs, file, self._key(file))
        for name in (set(stored) - set(local)) if replace else ():
            if not _skipped(name.split("/"), exclude):
                fs.delete_file(f"{self._key(path)}/{name}")

    def download(self, path: Path, exclude: tuple[str, ...] = (), replace: bool = True) -> None:
        """The store's files below `path` (not dot-files, nor below `exclude`d sub-folders);
        replace=False keeps local files of the same size."""
        fs, key = root_store(self.store_uri).fs, self._key(path)
        for name, size in self._listing(path).items():
            target = Path(path) / name
            if not (_skipped(name.split("/"), exclude) or (
                    not replace and target.is_file() and target.stat().st_size == size)):
                copy_down(fs, f"{key}/{name}", target)

    def folders(self, path: Path) -> list[str]:
        """The names of the store's sub-folders of `path`."""
        store, key = root_store(self.store_uri), self._key(path)
        infos = store.fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)

    def has(self, path: Path) -> bool:
        return root_store(self.store_uri).fs.get_file_info(self._key(path)).type == pafs.FileType.File

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError, OSError, pa.ArrowException):
            root_store(self.store_uri).fs.delete_dir(self._key(path))
