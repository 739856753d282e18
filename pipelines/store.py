"""The step store: a copy of every published step directory in an object store or any other
pyarrow.fs location (`paths.store`: s3://bucket/prefix, gs://..., hdfs://..., file:///...).

A run on another machine, or on a fresh ephemeral cluster, finds its finished steps there and
downloads them instead of computing them again; the store outlives the cluster. The layout is
the local one: `<store>/<step>/<fingerprint>/`. Uploads put every file first and the manifest
last: object stores write single objects atomically, so a step without its manifest is never
taken as a result, exactly as on disk. Downloads are checked against the manifest's sizes and
SHA-256 before they are renamed into place under `paths.root`.

    open_store(uri) -> Store | None;  store.manifest(step, fp);  store.push(step_dir);  store.pull(step, fp, root)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import artifacts
from tasks.common import UserError, files_problem

BLOCK = 1 << 20


@dataclass
class Store:
    uri: str
    fs: pafs.FileSystem
    base: str

    def path(self, step: str, fingerprint: str, name: str = "") -> str:
        return "/".join(part for part in (self.base.rstrip("/"), step, fingerprint, name) if part)

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
            target = self.path(step, fingerprint, name)
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with open(step_dir / name, "rb") as source, self.fs.open_output_stream(target) as sink:
                shutil.copyfileobj(source, sink, BLOCK)
        return True

    def pull(self, step: str, fingerprint: str, root: Path) -> dict:
        """Download a stored step into `<root>/<step>/<fingerprint>/` (staged, checked, renamed)."""
        manifest = self.manifest(step, fingerprint)
        if manifest is None:
            raise UserError(f"paths.store: {self.path(step, fingerprint)} has no complete step")
        staging = artifacts.staging_dir(root, step, fingerprint)  # under the step's lock (the executor's)
        try:
            for name in manifest["files"]:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(self.path(step, fingerprint, name)) as source, \
                        open(staging / name, "wb") as sink:
                    shutil.copyfileobj(source, sink, BLOCK)
            problem = files_problem(staging, manifest["files"])
            if problem:
                raise UserError(f"paths.store: the stored {step} {fingerprint} is damaged ({problem}); "
                                f"delete {self.path(step, fingerprint)} or rerun without paths.store")
            artifacts.install(staging, artifacts.step_dir(root, step, fingerprint), manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest


def open_store(uri: str) -> Store | None:
    """The store of `paths.store` (None when unset); UserError naming the key when it cannot be used."""
    if not uri:
        return None
    if "://" not in uri:
        raise UserError(f"paths.store: '{uri}' is not a URI (s3://bucket/prefix, gs://..., file:///abs/path)")
    try:
        fs, base = pafs.FileSystem.from_uri(uri)
        fs.get_file_info(base)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"paths.store: cannot use {uri} ({str(exc).splitlines()[0]})") from None
    return Store(uri, fs, base)
