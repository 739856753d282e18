"""`precision: auto`: bf16 autocast or fp32 on CPU, chosen by measuring which is faster here.

CPUs differ: with AMX or AVX-512 bf16, bf16 autocast runs the model's matrix multiplies natively and
is faster than fp32; with AVX2 only (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False) bf16 is
emulated and slower. So `auto` times the training's matrix-multiply shapes (forward and backward
of the attention and MLP projections and the output head, at the micro-batch's token count) in both
precisions on the worker's threads, and takes bf16 only where it is clearly faster. The result is
remembered per machine (CPU model and flags, torch version, shapes, threads) in a small JSON file
($LMFORGE_PRECISION_CACHE, default ~/.cache/lmforge/precision.json), so a later run decides in
milliseconds. A GPU takes bf16 without measuring (native there). An explicit bf16 or fp32 wins.

    choose(hidden, intermediate, vocab, tokens, threads, use_gpu) -> Choice(precision, reason)
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

BF16_MARGIN = 1.1  # bf16 rounds weights' updates; take it only when it is at least this much faster


@dataclass(frozen=True)
class Choice:
    precision: str  # "bf16" or "fp32"
    reason: str  # one line: what was measured or why nothing was


def cache_path() -> Path:
    configured = os.environ.get("LMFORGE_PRECISION_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "lmforge" / "precision.json"


def cpu_identity() -> str:
    """The CPU model and its feature flags (what decides bf16 speed), from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    model, flags = fields.get("model name\t", "").strip(), fields.get("flags\t\t", "").strip()
    return f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def matmul_shapes(hidden: int, intermediate: int, vocab: int, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of one layer's projections and the output head, forward and the two backward products."""
    forward = [(tokens, hidden, hidden), (tokens, hidden, intermediate), (tokens, intermediate, hidden),
               (tokens, hidden, vocab)]
    backward = [s for m, k, n in forward for s in ((m, n, k), (k, m, n))]
    return forward + backward


def seconds(shapes: list[tuple[int, int, int]], bf16: bool, repeats: int = 3) -> float:
    """The best of `repeats` passes over all shapes, under bf16 autocast or in fp32."""
    import torch  # torch only when measuring: a run whose choice is remembered starts without it

    operands = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up oneDNN's kernels
        started = time.perf_counter()
        with context():
            for a, b in operands:
                a @ b
        best = min(best, time.perf_counter() - started)
    return best


def native_bf16() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def measure(hidden: int, intermediate: int, vocab: int, tokens: int, threads: int) -> Choice:
    if not native_bf16():
        return Choice("fp32", "auto: this CPU has no native bf16 (AVX2 only), so bf16 autocast would be emulated")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shapes = matmul_shapes(hidden, intermediate, vocab, tokens)
        fp32, bf16 = seconds(shapes, False), seconds(shapes, True)
    finally:
        torch.set_num_threads(before)
    speedup = fp32 / bf16
    precision = "bf16" if speedup >= BF16_MARGIN else "fp32"
    return Choice(precision, f"auto: bf16 autocast {speedup:.2f}x the speed of fp32 for this model's matrix "
                             f"multiplies on {threads} thread(s) of this CPU (bf16 when >= {BF16_MARGIN})")


def choose(hidden: int, intermediate: int, vocab: int, tokens: int, threads: int, use_gpu: bool) -> Choice:
    """The precision `auto` means for this model and batch on this machine, measured once per machine."""
    if use_gpu:
        return Choice("bf16", "auto: bf16 is native on the GPU")
    key = f"{cpu_identity()}|torch {importlib.metadata.version('torch')}|{hidden},{intermediate},{vocab},{tokens}|{threads}"
    path = cache_path()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return Choice(**known[key])
    choice = measure(hidden, intermediate, vocab, tokens, threads)
    known[key] = {"precision": choice.precision, "reason": choice.reason}
    with contextlib.suppress(OSError):  # an unwritable home only costs the next run a second
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        scratch.write_text(json.dumps(known, indent=1))
        scratch.replace(path)
    return choice


def resolve(cfg):
    """cfg (conf.schema.Config) with every training section's `precision: auto` replaced by what this
    machine measures best, and {section key: Choice} for those; explicit settings are left alone.
    Done before planning, so the fingerprint holds the precision the model is trained in."""
    sections = {"pretrain": (cfg.pretrain, cfg.tokenizer.seq_len), "finetune": (cfg.finetune, cfg.finetune.max_length),
                **{f"finetunes.{name}": (section, section.max_length) for name, section in cfg.finetunes.items()}}
    choices = {}
    for key, (section, length) in sections.items():
        if section.precision == "auto":
            choices[key] = choose(cfg.model.hidden_size, cfg.model.intermediate_size, cfg.tokenizer.vocab_size,
                                  section.micro_batch_size * length, section.cpus_per_worker, section.use_gpu)
    chosen = lambda key, s: replace(s, precision=choices[key].precision) if key in choices else s
    return replace(cfg, pretrain=chosen("pretrain", cfg.pretrain), finetune=chosen("finetune", cfg.finetune),
                   finetunes={name: chosen(f"finetunes.{name}", s) for name, s in cfg.finetunes.items()}), choices
