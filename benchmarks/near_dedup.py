"""Near-dedup speed: the ingest step's numpy MinHash signatures and LSH (tasks/dedup.py) against a
pure-Python loop of the same algorithm, measured in the same run on the same documents.

Documents are seeded synthetic prose (--words words each, from a 420-word vocabulary); a tenth
of them are copies of another with one word changed. The pure-Python reference computes the
same signatures (checked equal on every document it signs) with Python integers, and buckets
with a dict per band; it signs at most --python-docs documents per size, because it is slow.
Printed: documents/s of each, and their ratio. One process, one core.

    python benchmarks/near_dedup.py [--sizes 1000 5000 20000] [--words 300] [--python-docs 200]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conf.schema import NearDedupConfig  # noqa: E402
from tasks import dedup  # noqa: E402

MASK64 = (1 << 64) - 1
VOCABULARY = [f"{a}{b}{c}" for a in "bcdfghklmnprst" for b in "aeiou" for c in "lmnrst"]


def corpus(num_docs: int, num_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        if i % 10 == 9:
            words = docs[rng.randrange(len(docs))].split()
            words[rng.randrange(len(words))] = "changed"
        else:
            words = [rng.choice(VOCABULARY) for _ in range(num_words)]
        docs.append(" ".join(words))
    return docs


def python_signature(text: str, cfg: NearDedupConfig, a: list[int], b: list[int]) -> list[int]:
    """The same signature as dedup.minhash(dedup.shingle_hashes(...)), with Python integers."""
    words = [zlib.crc32(w.encode()) for w in text.split()] or [0]
    n = min(cfg.shingle_size, len(words))
    shingles = set()
    for i in range(len(words) - n + 1):
        h = 0
        for k in range(n):
            h = (h * 0x9E3779B97F4A7C15 + words[i + k]) & MASK64
        shingles.add(h)
    return [min(((ai * s + bi) & MASK64) >> 32 for s in shingles) for ai, bi in zip(a, b)]


def python_lsh(signatures: list[list[int]], cfg: NearDedupConfig) -> int:
    """Candidate pairs (each document with the first of its bucket), with dicts: the count."""
    pairs = set()
    for band in range(cfg.bands):
        first = {}
        for index, sig in enumerate(signatures):
            key = tuple(sig[band * cfg.band_rows : (band + 1) * cfg.band_rows])
            leader = first.setdefault(key, index)
            if leader != index:
                pairs.add((leader, index))
    return len(pairs)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def measure(num_docs: int, num_words: int, python_docs: int, cfg: NearDedupConfig) -> dict:
    docs = corpus(num_docs, num_words)
    sigs, numpy_sig_s = timed(dedup.signatures, docs, cfg)
    dropped, numpy_lsh_s = timed(dedup.near_duplicates, sigs, cfg)
    a, b = (v.tolist() for v in dedup.hash_functions(cfg.num_perm, cfg.seed))
    subset = docs[:python_docs]
    py_sigs, python_sig_s = timed(lambda: [python_signature(t, cfg, a, b) for t in subset])
    assert py_sigs == sigs[: len(subset)].tolist(), "the pure-Python reference disagrees with tasks/dedup.py"
    _, python_lsh_s = timed(python_lsh, sigs.tolist(), cfg)
    return {"docs": num_docs, "near_dups": len(dropped), "planted": num_docs // 10,
            "numpy_sig": num_docs / numpy_sig_s, "python_sig": len(subset) / python_sig_s,
            "numpy_lsh": num_docs / numpy_lsh_s, "python_lsh": num_docs / python_lsh_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--python-docs", type=int, default=200)
    args = parser.parse_args()
    cfg = NearDedupConfig(enabled=True)
    measure(100, args.words, 10, cfg)  # warm-up: first calls of numpy functions are slower
    print(f"MinHash {cfg.num_perm} permutations, {cfg.bands} bands x {cfg.band_rows} rows, "
          f"{cfg.shingle_size}-word shingles, {args.words} words per document")
    print(f"{'docs':>7} {'found/planted':>13} {'sig numpy/s':>12} {'sig python/s':>13} {'ratio':>6} "
          f"{'LSH numpy/s':>12} {'LSH python/s':>13} {'ratio':>6}")
    for size in args.sizes:
        r = measure(size, args.words, args.python_docs, cfg)
        print(f"{r['docs']:>7} {r['near_dups']:>6}/{r['planted']:<6} {r['numpy_sig']:>12,.0f} {r['python_sig']:>13,.0f} "
              f"{r['numpy_sig'] / r['python_sig']:>6.1f} {r['numpy_lsh']:>12,.0f} {r['python_lsh']:>13,.0f} "
              f"{r['numpy_lsh'] / r['python_lsh']:>6.1f}")


if __name__ == "__main__":
    main()
