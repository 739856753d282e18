"""Step locks: when two launches of the same experiment share an artifact root, each step runs
once. The launch that runs a step holds `<root>/<step>/.lock-<fingerprint>` (created with
O_EXCL; it names the holder) and touches it every HEARTBEAT_S seconds; the other launch waits
and then uses the published result. A lock whose heartbeat is older than STALE_S seconds was
left by a dead process and is taken over.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

HEARTBEAT_S = 5.0
STALE_S = 60.0
POLL_S = 1.0


def lock_path(root: Path, step: str, fingerprint: str, kind: str = "lock") -> Path:
    """`kind` keeps a node's own work on a step (fetching it, running it for a launch elsewhere)
    apart from a launch's lock on the same step, when both use one node's directory."""
    return root / step / f".{kind}-{fingerprint}"


def holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError):
        return "another launch"


def try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, fh)
    return True


def holder_is_dead(path: Path) -> bool:
    """The holder ran on this machine and its process is gone."""
    try:
        info = json.loads(path.read_text())
        if info["host"] != socket.gethostname():
            return False
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError):
        return False
    return False


def is_held(path: Path) -> bool:
    """A lock (a step's, or a run's live marker) whose holder is alive: a fresh heartbeat, and not a
    process on this machine that has exited (a SIGKILLed launch is seen at once)."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age < STALE_S and not holder_is_dead(path)


def take_over_if_stale(path: Path, stale_s: float) -> str | None:
    """Move aside a lock without a recent heartbeat, or one whose holder died on this machine
    (atomically: one taker wins); returns what happened to its holder."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    dead = holder_is_dead(path)
    if age < stale_s and not dead:
        return None
    who = holder(path) + (", which has exited" if dead else f", no heartbeat for {age:.0f} s")
    try:
        os.rename(path, path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}"))
    except FileNotFoundError:
        return None
    for old in path.parent.glob(f"{path.name}.stale-*"):
        old.unlink(missing_ok=True)
    return who


@contextlib.contextmanager
def step_lock(path: Path, say: Callable[[str], None], heartbeat_s: float = HEARTBEAT_S,
              stale_s: float = STALE_S):
    """Hold the step's lock for the duration; waits while a live launch holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    waiting_said = False
    while not try_create(path):
        taken = take_over_if_stale(path, stale_s)
        if taken:
            say(f"took over a lock left by {taken}")
            continue
        if not waiting_said:
            say(f"waiting: {holder(path)} is running this step")
            waiting_said = True
        time.sleep(POLL_S)
    stop = threading.Event()

    def beat():
        while not stop.wait(heartbeat_s):
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)

    thread = threading.Thread(target=beat, name=f"heartbeat {path.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)
