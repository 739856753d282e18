"""Decontamination report: word n-gram overlap between evaluation / fine-tuning sets and the
pretraining corpus (the GPT-3 / Dolma approach: an example is contaminated when one of its
n-grams, 13 words by default, also occurs in some corpus document).

Words are compared lower-cased with punctuation removed; n-grams are hashed with the same
stable 64-bit shingle hash as near-dedup (tasks/dedup.py). Examples shorter than n words cannot
be checked and are counted as such. The report names, per set, how many examples are
contaminated, a few of them, and the corpus documents they overlap (the ids that removal drops).

    report(corpus, sets, n) -> {set name: {...}}; corpus: [(doc_id, text)], sets: {name: [text]}
"""
from __future__ import annotations

import re

import numpy as np

from tasks.dedup import shingle_hashes

_NON_WORD = re.compile(r"[^\w\s]+")
EXAMPLES_SHOWN = 3


def comparable(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower())


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Hashes of the text's word n-grams; empty when it has fewer than n words."""
    text = comparable(text)
    return shingle_hashes(text, n) if len(text.split()) >= n else np.zeros(0, dtype=np.uint64)


def report(corpus: list[tuple[str, str]], sets: dict[str, list[str]], n: int = 13) -> dict[str, dict]:
    """Per set: examples, examples checked (at least n words), contaminated ones (share, a few shown)
    and the ids of the corpus documents they overlap."""
    set_hashes = {name: [ngram_hashes(text, n) for text in texts] for name, texts in sets.items()}
    wanted = np.unique(np.concatenate([h for hashes in set_hashes.values() for h in hashes] or [np.zeros(0, np.uint64)]))
    found: dict[int, list[str]] = {}  # n-gram hash of some example -> corpus documents holding it
    for doc_id, text in corpus:
        for value in np.intersect1d(ngram_hashes(text, n), wanted, assume_unique=True).tolist():
            found.setdefault(value, []).append(doc_id)
    return {name: set_report(sets[name], hashes, found) for name, hashes in set_hashes.items()}


def set_report(texts: list[str], hashes: list[np.ndarray], found: dict[int, list[str]]) -> dict:
    contaminated, docs = [], set()
    for text, example_hashes in zip(texts, hashes):
        overlapping = {doc for value in example_hashes.tolist() for doc in found.get(value, ())}
        if overlapping:
            contaminated.append(text)
            docs |= overlapping
    checked = sum(1 for h in hashes if len(h))
    return {"examples": len(texts), "checked": checked, "contaminated": len(contaminated),
            "share": round(len(contaminated) / max(checked, 1), 6), "corpus_docs": sorted(docs),
            "shown": [text[:500] for text in contaminated[:EXAMPLES_SHOWN]]}
