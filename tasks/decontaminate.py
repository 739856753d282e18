"""decontaminate: word n-gram overlap between the task's evaluation / fine-tuning sets and the
pretraining corpus (the GPT-3 / Dolma approach: an example is contaminated when one of its
n-grams, 13 words by default, also occurs in some corpus document).

Words are compared lower-cased with punctuation removed; n-grams are hashed with the same
stable 64-bit shingle hash as near-dedup (tasks/dedup.py). Examples shorter than n words cannot
be checked and are counted as such. The report names, per set, how many examples are
contaminated, a few of them, and the corpus documents they overlap. The step writes that
report (report.json) and the ids of those documents (contaminated_docs.json), which tokenize leaves
out when `decontaminate.remove` is set. The corpus is hashed shard by shard in parallel tasks.

    run(cfg: DecontaminateConfig, inputs={"ingest", "taskdata"}, out_dir, ctx) -> metrics
    report(corpus, sets, n) -> {set name: {...}}; corpus: [(doc_id, text)], sets: {name: [text]}
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from conf.schema import DecontaminateConfig
from tasks.common import TaskContext, UserError, read_jsonl, write_json
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
    return report_with(lambda wanted: find_ngrams(corpus, wanted, n), sets, n)


def report_with(find: Callable[[np.ndarray], dict[int, list[str]]], sets: dict[str, list[str]], n: int) -> dict[str, dict]:
    """`report`, with `find(wanted n-gram hashes) -> {hash: corpus doc ids}` searching the corpus."""
    set_hashes = {name: [ngram_hashes(text, n) for text in texts] for name, texts in sets.items()}
    wanted = np.unique(np.concatenate([h for hashes in set_hashes.values() for h in hashes] or [np.zeros(0, np.uint64)]))
    found = find(wanted)
    return {name: set_report(sets[name], hashes, found) for name, hashes in set_hashes.items()}


def find_ngrams(corpus, wanted: np.ndarray, n: int) -> dict[int, list[str]]:
    """n-gram hash of some example -> the corpus documents holding it."""
    found: dict[int, list[str]] = {}
    for doc_id, text in corpus:
        for value in np.intersect1d(ngram_hashes(text, n), wanted, assume_unique=True).tolist():
            found.setdefault(value, []).append(doc_id)
    return found


def record_text(record: dict) -> str:
    """Everything a task record shows the model: its string fields, or its messages' contents."""
    if "messages" in record:
        return "\n".join(str(m.get("content", "")) for m in record["messages"])
    return "\n".join(value for value in record.values() if isinstance(value, str))


def shard_ngrams(shard: str, wanted: np.ndarray, n: int) -> dict[int, list[str]]:
    """find_ngrams over one ingest shard (a parallel task)."""
    import pyarrow.parquet as pq

    table = pq.read_table(shard, columns=["doc_id", "text"])
    return find_ngrams(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()), wanted, n)


def run(cfg: DecontaminateConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    from tasks.ingest import read_shards

    missing = [name for name in cfg.sets if not (Path(inputs["taskdata"]) / f"{name}.jsonl").is_file()]
    if missing:
        raise UserError(f"decontaminate.sets: the task data has no split {missing[0]!r} (train, val, test)")
    sets = {name: [record_text(r) for r in read_jsonl(Path(inputs["taskdata"]) / f"{name}.jsonl")] for name in cfg.sets}
    shards = [str(path) for path in read_shards(inputs["ingest"])]
    ctx.say(f"looking for the {cfg.ngram}-grams of {sum(map(len, sets.values()))} task records in {len(shards)} corpus shards")

    def find_in_shards(wanted: np.ndarray) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for part in ctx.parallel_map(lambda shard: shard_ngrams(shard, wanted, cfg.ngram), shards):
            for value, docs in part.items():
                found.setdefault(value, []).extend(docs)
        return found

    result = report_with(find_in_shards, sets, cfg.ngram)
    docs = sorted({doc for entry in result.values() for doc in entry["corpus_docs"]})
    write_json(out_dir / "report.json", {"ngram": cfg.ngram, "sets": result})
    write_json(out_dir / "contaminated_docs.json", docs)
    ctx.say("; ".join(f"{name}: {r['contaminated']} of {r['checked']} checked records overlap the corpus"
                      for name, r in result.items()) + f"; {len(docs)} corpus documents involved")
    metrics = {"corpus_docs_contaminated": len(docs)}
    for name, entry in result.items():
        metrics.update({f"{name}_checked": entry["checked"], f"{name}_contaminated": entry["contaminated"],
                        f"{name}_contaminated_share": entry["share"]})
    return metrics


def contaminated_docs(decontaminate_dir: Path) -> set[str]:
    """The corpus documents the decontaminate step found overlapping a checked set."""
    return set(json.loads((Path(decontaminate_dir) / "contaminated_docs.json").read_text()))


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
