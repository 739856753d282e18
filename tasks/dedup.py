"""Near-duplicate detection with MinHash LSH, vectorised with numpy (no datasketch dependency).

A document is the set of its word shingles (`shingle_size` words). Each shingle gets a stable
64-bit hash (from CRC-32 word hashes) (the same in every process: Python's own `hash` of a str is salted per process);
`num_perm` multiply-shift hash functions, drawn from `seed`, turn the shingle hashes into a
MinHash signature (one uint32 per function, the minimum over the shingles). The ingest step
computes signatures in its parallel tasks; `near_duplicates` then buckets all of them at once
(LSH: `bands` bands of `band_rows` rows), checks each candidate pair's estimated Jaccard
similarity against `jaccard_threshold`, and joins similar documents into groups (union-find):
of each group the first document in corpus order is kept. benchmarks/near_dedup.py measures it
against a pure-Python loop.

    signatures(texts, cfg: NearDedupConfig) -> (num_docs, num_perm) uint32
    near_duplicates(signatures, cfg) -> {index of a document to drop: index of the one kept for it}
"""
from __future__ import annotations

import zlib

import numpy as np

from conf.schema import NearDedupConfig

BLOCK_SHINGLES = 4096  # shingles hashed at once: bounds memory at BLOCK_SHINGLES x num_perm x 8 bytes
_MASK64 = (1 << 64) - 1
_SHINGLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio)


def hash_functions(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the multiply-shift hash functions h(x) = (a*x + b) >> 32, a odd, fixed by seed."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def word_hashes(words: list[str]) -> np.ndarray:
    """A stable 32-bit hash (CRC-32, the same in every process) of each word, as uint64."""
    return np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """A 64-bit hash of each distinct run of shingle_size words (the whole text if shorter)."""
    hashes = word_hashes(text.split())
    if len(hashes) == 0:
        return np.zeros(1, dtype=np.uint64)
    n = min(shingle_size, len(hashes))
    combined = np.zeros(len(hashes) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around arithmetic modulo 2**64 is the point
        for k in range(n):
            combined = combined * _SHINGLE_MULTIPLIER + hashes[k : len(hashes) - n + 1 + k]
    return np.unique(combined)


def minhash(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature (uint32 per hash function) of one document's shingle hashes."""
    signature = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(shingles), BLOCK_SHINGLES):
            block = shingles[start : start + BLOCK_SHINGLES, None]
            np.minimum(signature, ((block * a + b) >> np.uint64(32)).min(axis=0), out=signature)
    return signature.astype(np.uint32)


def signatures(texts: list[str], cfg: NearDedupConfig) -> np.ndarray:
    """MinHash signatures of documents, one row each (runs inside the parallel ingest tasks)."""
    a, b = hash_functions(cfg.num_perm, cfg.seed)
    rows = [minhash(shingle_hashes(text, cfg.shingle_size), a, b) for text in texts]
    return np.stack(rows) if rows else np.zeros((0, cfg.num_perm), dtype=np.uint32)


def band_keys(sigs: np.ndarray, bands: int, band_rows: int) -> np.ndarray:
    """(num_docs, bands) uint64: a hash of each band's rows (a rare collision only adds a candidate,
    which the Jaccard check then rejects)."""
    multipliers = hash_functions(band_rows, seed=-1 % 2**32)[0]
    rows = sigs.reshape(len(sigs), bands, band_rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        return (rows * multipliers).sum(axis=2, dtype=np.uint64)


def candidate_pairs(sigs: np.ndarray, bands: int, band_rows: int) -> np.ndarray:
    """(earlier, later) document pairs that agree on all rows of some band: each document is paired
    with the first document of each of its buckets. Sorted, without repeats."""
    keys, pairs = band_keys(sigs, bands, band_rows), []
    for band in range(bands):
        _, first, inverse = np.unique(keys[:, band], return_index=True, return_inverse=True)
        leader = first[inverse.ravel()]
        members = np.flatnonzero(leader != np.arange(len(sigs)))
        pairs.append(np.stack([leader[members], members], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def near_duplicates(sigs: np.ndarray, cfg: NearDedupConfig) -> dict[int, int]:
    """Each document similar to an earlier one (directly or through others) -> the first document of
    its group, which is kept. Ascending by document."""
    pairs = candidate_pairs(sigs, cfg.bands, cfg.band_rows)
    if len(pairs) == 0:
        return {}
    similarity = (sigs[pairs[:, 0]] == sigs[pairs[:, 1]]).mean(axis=1)
    parent = list(range(len(sigs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for first, second in pairs[similarity >= cfg.jaccard_threshold].tolist():
        low, high = sorted((root(first), root(second)))
        parent[high] = low  # the group's root is always its earliest document
    return {i: root(i) for i in range(len(sigs)) if root(i) != i}
