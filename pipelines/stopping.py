"""How a run stops early and keeps what it finished: SIGTERM (a preemption) or SIGINT (Ctrl-C) asks a running
training step to checkpoint and return (`STOP`, `Preempted`), through the step's stop channel
(pipelines/storage.py: a file in the step's directory, or an object in the store); a step that fails
on a full disk is reported as such (`DiskFull`, `out_of_space`). Used by executor.py and run.py; it
gets the Ray Train trainer from executor.py and knows no Ray itself.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

STOP_GRACE_SECONDS = 300  # after SIGTERM or SIGINT, the longest wait for a training step's checkpoint


LOW_SPACE_BYTES = 1 << 20  # a step that fails with less free space than this is taken to have filled the disk


class DiskFull(Exception):
    """A step failed because its filesystem is full; nothing partial was published."""


def out_of_space(error: BaseException, directory: Path) -> bool:
    """Whether a step's failure comes from a full disk: ENOSPC anywhere in its message (Ray and
    torch re-wrap OSErrors), or (torch reports only 'file write failed') almost no space left."""
    if "No space left on device" in str(error):
        return True
    try:
        return shutil.disk_usage(directory if directory.exists() else directory.parent).free < LOW_SPACE_BYTES
    except OSError:
        return False


class Preempted(Exception):
    """SIGTERM or SIGINT stopped the run; finished steps and the running training step's checkpoint are kept."""

    def __init__(self, message: str, exit_code: int = 143):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """SIGTERM (a preemption) and SIGINT (Ctrl-C) handling for the driver, one path for both. During a
    training step it asks the workers (through a file in the step's directory, or an object in the
    store) to checkpoint at the end of their current step and return; otherwise it stops at once. A
    second signal, or no checkpoint within STOP_GRACE_SECONDS, ends the process. The exit code is
    128 + the signal's number (143, 130)."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal_name = ""  # the signal that asked for the stop, once one did
        self.on_stop = None  # set during a training step: asks its workers to stop

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + getattr(signal, self.signal_name or "SIGTERM")

    def __enter__(self):
        import signal

        self.signal_name = ""
        self.previous = {name: signal.signal(getattr(signal, name), self.handle) for name in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        import signal

        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def while_training(self, request_stop, train):
        """train(), during which a stop signal calls request_stop() (the training step's stop channel)."""
        self.on_stop = request_stop
        try:
            return train()
        finally:
            self.on_stop = None

    def handle(self, signum, _frame):
        import signal
        import sys
        import threading

        if self.signal_name:
            print(f"second {signal.Signals(signum).name}: stopping now", file=sys.stderr, flush=True)
            os._exit(self.exit_code)
        self.signal_name = signal.Signals(signum).name
        if self.on_stop is None:
            raise Preempted(f"stopped by {self.signal_name}: finished steps are kept; rerun the same command "
                            f"to continue", self.exit_code)
        print(f"{self.signal_name}: the training step checkpoints at the end of its current step, then the run stops",
              file=sys.stderr, flush=True)
        self.on_stop()
        timer = threading.Timer(STOP_GRACE_SECONDS, lambda: (print(
            f"no checkpoint within {STOP_GRACE_SECONDS} s of {self.signal_name}: stopping now", file=sys.stderr,
            flush=True), os._exit(self.exit_code)))
        timer.daemon = True
        timer.start()


def fit_off_main_thread(trainer):
    """trainer.fit() in a helper thread while the main thread waits. Called in the main thread, Ray
    Train replaces the driver's SIGINT handler with its own, which aborts training without a
    checkpoint and exits 1 (and never puts ours back); off it, Ray Train leaves signals alone, so
    Ctrl-C takes the SIGTERM path."""
    import threading

    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the caller, as fit() would raise it
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray train fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a short wait: the main thread runs the signal handlers in between
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


STOP = StopRequest()
