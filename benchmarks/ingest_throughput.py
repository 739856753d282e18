"""Ingest step throughput on 1 and 2 CPUs, measured in the same run on the same generated corpus,
and a check that both outputs are identical.

The corpus (--mb megabytes of JSONL, default 100) is cut from the text of Python's standard
library (tests included, 31 MB), tiled into windows of one length per pass (four lengths, so that
documents overlap only partly); 3% of the documents are exact copies of an earlier one and 2% near
copies (one word changed). Most files
are about 0.5 MB; --large-files of them are about 12 MB, which the step splits into byte ranges.
The ingest step runs with quality filters, exact dedup and near-dedup (MinHash LSH) on, as
`tasks.ingest.run` with its parallel map on an embedded Ray of 1 CPU (the reference), then of 2
CPUs; each from a fresh Ray and a fresh work directory. Printed: MB/s and documents/s of each and
the speedup of 2 CPUs over 1; the outputs (every shard's bytes, every metric but the unit counts)
must be identical.

    python benchmarks/ingest_throughput.py [--mb 100] [--large-files 3] [--shard-mb 0]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conf.schema import DataConfig, NearDedupConfig  # noqa: E402
from tasks import ingest  # noqa: E402
from tasks.common import TaskContext  # noqa: E402

WINDOWS = (900, 2600, 7000, 19000)  # characters: a shorter window inside a longer one shares < 0.5 of it
SMALL_FILE_BYTES, LARGE_FILE_BYTES = 500_000, 12_000_000


def stdlib_text() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def documents(text: str, num_bytes: int, seed: int = 0):
    """The text tiled into windows, one length per pass (a window lies in a longer one at most 0.35
    of it, so they are not near-duplicates), with planted exact and near copies."""
    rng, recent, produced = random.Random(seed), [], 0
    for length in WINDOWS * 4:
        for start in range(rng.randrange(length), len(text) - length, length):
            doc, roll = text[start : start + length], rng.random()
            if recent and roll < 0.03:
                doc = rng.choice(recent)
            elif recent and roll < 0.05:
                words = rng.choice(recent).split(" ")
                words[rng.randrange(len(words))] = "changed"
                doc = " ".join(words)
            recent = (recent + [doc])[-500:]
            produced += len(doc.encode("utf-8"))
            yield doc
            if produced >= num_bytes:
                return


def write_corpus(directory: Path, megabytes: float, large_files: int) -> int:
    """JSONL files of about SMALL_FILE_BYTES, the first `large_files` of about LARGE_FILE_BYTES; total bytes."""
    directory.mkdir(parents=True)
    total, index, out, written = 0, 0, None, 0
    for doc in documents(stdlib_text(), int(megabytes * 1e6)):
        if out is None or written >= (LARGE_FILE_BYTES if index <= large_files else SMALL_FILE_BYTES):
            out = open(directory / f"part-{index:04d}.jsonl", "w", encoding="utf-8")
            index, written = index + 1, 0
        line = json.dumps({"text": doc}) + "\n"
        out.write(line)
        written += len(line.encode("utf-8"))
        total += len(line.encode("utf-8"))
    return total


def measure(cfg: DataConfig, cpus: int, out_dir: Path) -> tuple[dict, float]:
    """(metrics, seconds) of one ingest run on a fresh embedded Ray of `cpus` CPUs."""
    import ray

    from pipelines.executor import ray_map

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", _node_ip_address="127.0.0.1")
    try:
        ctx = TaskContext("ingest", num_cpus=cpus, work_dir=out_dir.parent / f"work-{cpus}")
        ctx.parallel_map = lambda fn, items, on_result=None: ray_map(fn, items, ctx, on_result)
        ray_map(abs, [0] * cpus)  # the workers start before the clock does
        out_dir.mkdir()
        start = time.perf_counter()
        metrics = ingest.run(cfg, {}, out_dir, ctx)
        return metrics, time.perf_counter() - start
    finally:
        ray.shutdown()


def step_files(out_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--large-files", type=int, default=3)
    parser.add_argument("--shard-mb", type=float, default=0, help="data.shard_bytes in MB (0: automatic)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        num_bytes = write_corpus(work / "corpus", args.mb, args.large_files)
        cfg = DataConfig(paths=[str(work / "corpus")], near_dedup=NearDedupConfig(enabled=True),
                         shard_bytes=int(args.shard_mb * 1e6))
        runs = {cpus: measure(cfg, cpus, work / f"out-{cpus}") for cpus in (1, 2)}
        same = step_files(work / "out-1") == step_files(work / "out-2")
    (metrics, one_s), (metrics2, two_s) = runs[1], runs[2]
    result = lambda m: {k: v for k, v in m.items() if not k.startswith("units_")}
    dropped = {k.removeprefix("dropped_"): v for k, v in metrics.items() if k.startswith("dropped_") and v}
    print(f"{num_bytes / 1e6:.1f} MB in {metrics['sources']} files, {metrics['units_total']} work units; "
          f"{metrics['docs_in']:,} documents in, {metrics['docs_kept']:,} kept; dropped {dropped}")
    for cpus, (_, seconds) in runs.items():
        print(f"{cpus} CPU{'s' if cpus > 1 else ' '}   {seconds:7.1f} s {num_bytes / 1e6 / seconds:8.2f} MB/s "
              f"{metrics['docs_in'] / seconds:10,.0f} documents/s")
    print(f"speedup 1 -> 2 CPUs: {one_s / two_s:.2f}")
    print(f"outputs identical (shard bytes, metrics): {same and result(metrics) == result(metrics2)}")
    assert same and result(metrics) == result(metrics2), "the outputs of 1 and 2 CPUs differ"


if __name__ == "__main__":
    main()
