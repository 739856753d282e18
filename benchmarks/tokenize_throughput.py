"""Tokenize step throughput against raw `tokenizers.Tokenizer.encode_batch`, on the same text, the
same tokenizer and the same number of cores, measured in the same run.

The corpus is the ingest step's output for a sample of the standard library (--mb megabytes);
one BPE tokenizer (--vocab) is trained on it first and not timed. Step: `tasks.tokenize.
encode_and_pack` as the tokenize step runs it, on an embedded Ray with --cpus CPUs (Ray tasks
of `docs_per_task` documents, results shipped back, packed into rows and written); reference:
one `encode_batch` call over all documents in a fresh process whose Rust thread pool has --cpus
threads. Printed: tokens/s of each and their ratio (the target is at least 0.8). Each is
measured --repeats times, alternating, and the best kept, because shared machines are noisy.

    python benchmarks/tokenize_throughput.py [--mb 4] [--cpus 2] [--vocab 4096] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conf.schema import DataConfig, TokenizerConfig  # noqa: E402
from tasks import ingest, tokenize  # noqa: E402
from tasks.common import TaskContext  # noqa: E402

REFERENCE = """
import json, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = json.load(open(sys.argv[2]))
best = 0.0
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    num_tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    best = max(best, num_tokens / (time.perf_counter() - start))
print(json.dumps({"tokens": num_tokens, "tokens_per_s": best}))
"""


def corpus(work: Path, megabytes: float) -> list[str]:
    out = work / "ingest"
    out.mkdir()
    ingest.run(DataConfig(builtin=["python_stdlib"], max_bytes=int(megabytes * 1e6)), {}, out, TaskContext("ingest"))
    import pyarrow.parquet as pq

    return [t for shard in ingest.read_shards(out) for t in pq.read_table(shard).column("text").to_pylist()]


def reference(work: Path, tokenizer_path: Path, texts: list[str], cpus: int, repeats: int) -> dict:
    (work / "texts.json").write_text(json.dumps(texts))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(cpus), "RAYON_RS_NUM_CPUS": str(cpus)}
    result = subprocess.run([sys.executable, "-c", REFERENCE, str(tokenizer_path), str(work / "texts.json"), str(repeats)],
                            env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def measure(tokenizer, texts: list[str], cfg: TokenizerConfig, work: Path, cpus: int, repeats: int) -> tuple[dict, dict]:
    """(reference, step): the two alternate, so that a busy spell of the machine hits both."""
    import ray

    from pipelines.executor import ray_map

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        ctx = TaskContext("tokenize", num_cpus=cpus)
        ctx.parallel_map = lambda fn, items, on_result=None: ray_map(fn, items, on_result=on_result)
        is_val = [tokenize.is_validation(str(i), cfg.val_fraction) for i in range(len(texts))]
        tokenize.encode_and_pack(tokenizer, texts[:50], is_val[:50], cfg, work, ctx)  # warm-up: workers start
        raw, ours = {"tokens_per_s": 0.0}, {"tokens_per_s": 0.0}
        for _ in range(repeats):
            result = reference(work, work / "tokenizer.json", texts, cpus, 1)
            raw = max(raw, result, key=lambda r: r["tokens_per_s"])
            start = time.perf_counter()
            _, num_tokens, _ = tokenize.encode_and_pack(tokenizer, texts, is_val, cfg, work, ctx)
            ours = max(ours, {"tokens": num_tokens, "tokens_per_s": num_tokens / (time.perf_counter() - start)},
                       key=lambda r: r["tokens_per_s"])
    finally:
        ray.shutdown()
    return raw, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = corpus(work, args.mb)
        cfg = TokenizerConfig(vocab_size=args.vocab, seq_len=256)
        tokenizer = tokenize.train_tokenizer(texts, cfg)
        tokenizer.save(str(work / "tokenizer.json"))
        raw, ours = measure(tokenizer, texts, cfg, work, args.cpus, args.repeats)
    assert raw["tokens"] == ours["tokens"], f"different token counts: {raw['tokens']} vs {ours['tokens']}"
    print(f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB, {raw['tokens']:,} tokens, {args.cpus} CPUs")
    print(f"raw encode_batch   {raw['tokens_per_s']:>12,.0f} tokens/s")
    print(f"tokenize step      {ours['tokens_per_s']:>12,.0f} tokens/s")
    print(f"ratio              {ours['tokens_per_s'] / raw['tokens_per_s']:>12.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
