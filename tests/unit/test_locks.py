"""Step locks: one holder at a time, a heartbeat while held, takeover of a dead holder's lock."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from pipelines import locks


def test_second_launch_waits_until_the_holder_releases(tmp_path):
    path = tmp_path / "step" / ".lock-abc"
    events, messages = [], []
    holding = threading.Event()

    def first():
        with locks.step_lock(path, messages.append, heartbeat_s=0.05):
            holding.set()
            time.sleep(0.6)
            events.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait()
    mtime = path.stat().st_mtime
    with locks.step_lock(path, messages.append, heartbeat_s=0.05):
        events.append("second runs")
    thread.join()
    assert events == ["first done", "second runs"]
    assert any(m.startswith(f"waiting: pid {os.getpid()} on ") for m in messages)
    assert not path.exists()
    assert mtime > 0


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    path = tmp_path / ".lock-abc"
    with locks.step_lock(path, print, heartbeat_s=0.05):
        os.utime(path, (time.time() - 100, time.time() - 100))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 1


def test_lock_of_a_dead_process_or_without_heartbeat_is_taken_over(tmp_path, fault_table):
    path = tmp_path / ".lock-abc"
    path.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "since": 0}))
    messages = []
    with locks.step_lock(path, messages.append):
        pass
    assert messages and "which has exited" in messages[0]

    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0}))  # another machine, silent
    os.utime(path, (time.time() - 120, time.time() - 120))
    messages.clear()
    with locks.step_lock(path, messages.append, stale_s=60):
        pass
    assert "pid 1 on elsewhere, no heartbeat for 120 s" in messages[0]
    fault_table("lock left by a dead launch", "lock of an exited pid; lock with a 120 s old heartbeat",
                "taken over, with a message naming the holder", "-", "0")


def test_the_embedded_ray_listens_on_loopback_only(monkeypatch, tiny_cfg):
    import ray

    from pipelines import executor

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2})
    executor.start_ray(tiny_cfg)
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["include_dashboard"] is False
