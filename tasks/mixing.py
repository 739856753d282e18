"""Per-source weights of the ingest step (data mixing).

Each entry of `data.paths` (weight from `data.weights`, same order) and each builtin corpus
(weight 1) is a group. After dedup, every kept document of a group with weight w appears
floor(w) times in the output, plus once more if a seeded hash of its id falls below the
fractional part of w: a weight of 0.5 keeps about half of the group (the rest count as
'subsampled'), 2.5 writes every document twice and half of them a third time. Repeats follow
all first copies (round by round), so one document's copies are far apart in the shards. The
shares written per group go to `mixture.json` and the step's metrics.

    mix(docs, groups, seed) -> (first copies, repeats)
    report(groups, written) -> [{group, weight, docs_written, bytes_written, share}]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from tasks.common import hash_fraction
from tasks.sources import Source


class Doc(NamedTuple):
    """A document as the ingest step writes it (doc_id, text, source) and the file it came from."""

    doc_id: str
    text: str
    source: str
    origin: str


@dataclass
class Group:
    """A data.paths entry or builtin corpus, its weight and its sources."""

    name: str
    weight: float
    sources: list[Source]


def weight_by_origin(groups: list[Group]) -> dict[str, tuple[str, float]]:
    """Source key -> (group name, weight); a file that several groups match belongs to the first."""
    table: dict[str, tuple[str, float]] = {}
    for group in groups:
        for source in group.sources:
            table.setdefault(source.key, (group.name, group.weight))
    return table


def copies(doc: Doc, weight: float, seed: int) -> int:
    whole = int(weight)
    return whole + (hash_fraction(doc.doc_id, seed) < weight - whole)


def mix(docs: list[Doc], groups: list[Group], seed: int) -> tuple[list[Doc], list[Doc]]:
    """(the documents written at least once, in order; their further copies, round by round)."""
    table = weight_by_origin(groups)
    first, repeats = [], []
    for index, doc in enumerate(docs):
        count = copies(doc, table[doc.origin][1], seed)
        if count:
            first.append(doc)
            repeats += [(round_, index, doc) for round_ in range(1, count)]
    return first, [doc for _, _, doc in sorted(repeats, key=lambda item: item[:2])]


def report(groups: list[Group], written: list[Doc]) -> list[dict]:
    """Documents, bytes and byte share written per group."""
    table = weight_by_origin(groups)
    rows = {group.name: {"group": group.name, "weight": group.weight, "docs_written": 0, "bytes_written": 0}
            for group in groups}
    for doc in written:
        row = rows[table[doc.origin][0]]
        row["docs_written"] += 1
        row["bytes_written"] += len(doc.text.encode("utf-8"))
    total = max(sum(row["bytes_written"] for row in rows.values()), 1)
    for row in rows.values():
        row["share"] = round(row["bytes_written"] / total, 6)
    return list(rows.values())
