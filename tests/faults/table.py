"""Runs the fault-injection tests and prints what each one did, as a table: scenario, fault
injected, outcome, work redone, data lost. Every row is written by a passing test from what it
measured (the `fault_table` fixture in tests/conftest.py); a failing test leaves no row and is
listed below the table.

    .venv/bin/python tests/faults/table.py            # all of them, about 15 minutes on 2 cores
    .venv/bin/python tests/faults/table.py -k kill    # some of them (pytest's -k)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = [
    "tests/faults/test_random_kills.py",
    "tests/faults/test_ingest_kill.py",
    "tests/e2e/test_crash_resume.py",
    "tests/faults/test_concurrent_launches.py",
    "tests/faults/test_disk_full.py",
    "tests/e2e/test_mlflow_server.py::test_an_unreachable_server_stops_the_run_at_once_naming_it",
    "tests/e2e/test_mlflow_server.py::test_a_server_lost_mid_run_loses_nothing",
    "tests/unit/test_dag.py::test_damaged_step_directory_is_detected_and_recomputed",
    "tests/unit/test_locks.py::test_lock_of_a_dead_process_or_without_heartbeat_is_taken_over",
    "tests/integration/test_checkpoints.py::test_damaged_newest_checkpoint_falls_back_to_the_previous_one",
    "tests/integration/test_checkpoints.py::test_planted_pickle_in_a_checkpoint_is_refused",
]
COLUMNS = ("scenario", "fault", "outcome", "redone", "lost")
HEADERS = ("scenario", "fault injected", "outcome", "work redone", "data lost")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "faults.jsonl"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *argv],
                              cwd=REPO, env={**os.environ, "LMFORGE_FAULT_TABLE": str(table)},
                              capture_output=True, text=True)
        rows = [json.loads(line) for line in table.read_text().splitlines()] if table.exists() else []
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "---|" * len(HEADERS))
    for row in rows:
        print("| " + " | ".join(str(row[c]).replace("|", "/") for c in COLUMNS) + " |")
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    print(f"\n{len(rows)} scenarios measured; pytest: {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else '?'}")
    for line in failed:
        print("  " + line)
    if failed:
        print("\n" + "\n".join(line for line in proc.stdout.splitlines() if line.startswith("E ")))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
