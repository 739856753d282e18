"""Rank 0's view of training: progress lines with ETA, metric calls, the history file
(train_log.jsonl) with tokens/s, model FLOP utilisation and peak memory, and the final summary."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.common import TaskContext, format_seconds


def peak_memory_gb(use_gpu: bool) -> float:
    if use_gpu:
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


@dataclass
class TrainLog:
    """Rank 0's progress lines, metric calls and the history file (train_log.jsonl)."""

    ctx: TaskContext
    rank: int
    max_steps: int
    tokens_per_step: int
    history_path: Path
    flops_per_token: float = 0.0
    peak_flops: float = 0.0
    use_gpu: bool = False

    def __post_init__(self):
        self.start = self.last_time = time.monotonic()
        self.last_step = self.first_step = 0
        self.excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent on evaluation or checkpoints: not counted in tokens/s."""
        self.excluded += seconds

    def resume_at(self, step: int) -> None:
        """Forget history past the starting step (those steps run again) and say where training resumes."""
        self.last_step = self.first_step = step
        if self.rank != 0:
            return
        if self.history_path.exists():
            rows = [line for line in self.history_path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.history_path.write_text("".join(row + "\n" for row in rows))
        if step:
            self.ctx.say(f"resumed from the checkpoint at step {step}/{self.max_steps}")

    def record(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        now = time.monotonic()
        steps_done = step - self.last_step
        metrics["tokens_per_s"] = steps_done * self.tokens_per_step / max(now - self.last_time - self.excluded, 1e-9)
        self.last_time, self.last_step, self.excluded = now, step, 0.0
        if self.flops_per_token and self.peak_flops:
            metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / self.peak_flops
        metrics["memory_gb"] = peak_memory_gb(self.use_gpu)
        with open(self.history_path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.ctx.log_metrics(metrics, step)
        eta = (now - self.start) / max(step - self.first_step, 1) * (self.max_steps - step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("tokens_per_s", "memory_gb"))
        self.ctx.say(f"step {step}/{self.max_steps} {shown} tok/s {metrics['tokens_per_s']:,.0f} "
                     f"eta {format_seconds(eta)}")


PLATEAU_RATIO = 0.95
"""A training loss that ends above this share of its first logged value never left its start."""


def convergence_warnings(rows: list[dict]) -> list[str]:
    """Signs that a run is far from converged: the training loss never left its starting plateau, or
    the validation (accuracy, else loss) was still improving at the last validation."""
    warnings = []
    losses = [r["loss"] for r in rows if "loss" in r]
    if len(losses) >= 3 and losses[-1] > PLATEAU_RATIO * losses[0]:
        warnings.append(f"training loss {losses[0]:.4g} -> {losses[-1]:.4g}: it never left its starting plateau "
                        f"(try a higher learning rate or more steps)")
    metric = "val_accuracy" if any("val_accuracy" in r for r in rows) else "val_loss"
    values = [r[metric] if metric == "val_accuracy" else -r[metric] for r in rows if metric in r]
    if len(values) >= 3 and values[-1] > max(values[:-1]):
        warnings.append(f"{metric} was still improving at the last validation: more steps (or epochs) may help")
    return warnings


def log_final(log: TrainLog) -> dict:
    if log.rank != 0 or not log.history_path.exists():
        return {}
    rows = [json.loads(line) for line in log.history_path.read_text().splitlines()]
    final = {f"final_{k}": v for k, v in rows[-1].items() if k in ("loss", "val_loss", "val_ppl", "val_accuracy")}
    for warning in convergence_warnings(rows):
        log.ctx.say(f"warning: {warning}")
        final["not_converged"] = 1
    for key in ("tokens_per_s", "mfu"):  # the first window includes start-up
        values = [r[key] for r in rows[1:] if key in r] or [r[key] for r in rows if key in r]
        if values:
            final[key] = float(np.median(values))
    final["memory_gb"] = max(r["memory_gb"] for r in rows)
    final["train_seconds"] = time.monotonic() - log.start
    return final
