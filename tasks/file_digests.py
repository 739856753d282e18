"""Content digests of local corpus files, remembered by what `stat` says about them.

A step's fingerprint should change when a file's bytes change, not when only its modification time
does (a fresh clone, `cp` without `-p`, a data set mounted on a new machine): otherwise a touched
corpus reruns ingest, tokenize and an hour of pretraining for nothing. Hashing a large corpus at
every launch would be slow, so each digest is kept in a small SQLite file keyed by (path, size,
modification time, inode): a file is read again only when one of them changes, and a touched file
whose bytes are the same gets the same digest.

The cache lives at $LMFORGE_DIGEST_CACHE, else $XDG_CACHE_HOME/lmforge/file-digests.sqlite (by
default under ~/.cache). When it cannot be opened the digests are computed without it.

    local_digests(paths) -> {path: 16-hex SHA-256 of its bytes}
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import sys
from pathlib import Path

CACHE_ENV = "LMFORGE_DIGEST_CACHE"
ANNOUNCE_BYTES = 1 << 30  # hashing more than this (files not seen before) says so first


def cache_path() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmforge" / "file-digests.sqlite"


def sha256_of(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:16]


def open_cache() -> sqlite3.Connection | None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER,"
                   " digest TEXT, PRIMARY KEY (path, size, mtime_ns, inode))")
        return db
    except (OSError, sqlite3.Error):
        return None


def local_digests(paths: list[str]) -> dict[str, str]:
    """SHA-256 (16 hex digits) of each local file's bytes; only files whose (path, size, mtime,
    inode) the cache has not seen are read."""
    if not paths:
        return {}
    stats = {path: os.stat(path) for path in paths}
    keys = {path: (path, st.st_size, st.st_mtime_ns, st.st_ino) for path, st in stats.items()}
    db = open_cache()
    known: dict[str, str] = {}
    with contextlib.closing(db) if db else contextlib.nullcontext():
        if db:
            with contextlib.suppress(sqlite3.Error):
                for path, key in keys.items():
                    row = db.execute("SELECT digest FROM digests WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                                     key).fetchone()
                    if row:
                        known[path] = row[0]
        missing = [path for path in paths if path not in known]
        total = sum(stats[path].st_size for path in missing)
        if total > ANNOUNCE_BYTES:
            print(f"hashing {total / 1e9:.1f} GB of corpus files not seen before (once: remembered in {cache_path()})",
                  file=sys.stderr, flush=True)
        fresh = {path: sha256_of(path) for path in missing}
        if db and fresh:
            with contextlib.suppress(sqlite3.Error), db:
                db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)",
                               [(*keys[path], digest) for path, digest in fresh.items()])
    return {**known, **fresh}
