"""A training process killed with SIGKILL continues from its last checkpoint on the next run,
and the losses after the resume equal those of an uninterrupted run exactly (CPU, fp32)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tasks import ingest, tokenize
from tasks.common import TaskContext
from tests.conftest import REPO, compose_config


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def helper(tokenize_dir, out_dir):
    return subprocess.Popen([sys.executable, "-m", "tests.integration.resume_helper", str(tokenize_dir), str(out_dir),
                             free_port()], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def history(out_dir):
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


def last_logged_step(out_dir) -> int:
    try:
        return history(out_dir)[-1]["step"]
    except (OSError, IndexError, ValueError):
        return 0


@pytest.mark.slow
def test_killed_training_resumes_with_identical_losses(tmp_path):
    cfg = compose_config(["+experiment=tiny"])
    ingest_dir, tokenize_dir = tmp_path / "ingest", tmp_path / "tokenize"
    ingest_dir.mkdir(), tokenize_dir.mkdir()
    ingest.run(cfg.data, {}, ingest_dir, TaskContext("ingest"))
    tokenize.run(cfg.tokenizer, {"ingest": ingest_dir}, tokenize_dir, TaskContext("tokenize"))

    reference = tmp_path / "reference"
    run = helper(tokenize_dir, reference)
    assert run.wait(timeout=600) == 0, run.stdout.read()

    crashed = tmp_path / "crashed"
    run = helper(tokenize_dir, crashed)
    deadline = time.monotonic() + 600
    while last_logged_step(crashed) < 45 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.kill()  # SIGKILL: no handler runs
    run.wait()
    killed_at = last_logged_step(crashed)
    assert 45 <= killed_at < 300, f"the run was not killed mid-way (last logged step {killed_at})"
    assert (crashed / "checkpoints" / "latest").exists()

    run = helper(tokenize_dir, crashed)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    resumed_at = int(output.split("resumed from the checkpoint at step ")[1].split("/")[0])
    assert 40 <= resumed_at <= killed_at and resumed_at % 10 == 0

    losses = lambda out: [(r["step"], r["loss"], r.get("val_loss")) for r in history(out)]
    assert losses(crashed) == losses(reference)  # exact, including the steps after the resume
    assert not (crashed / "checkpoints").exists()  # removed once the step finished
