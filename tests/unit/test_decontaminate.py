"""Decontamination report (tasks/decontaminate.py): planted overlaps are found, nothing else."""
from __future__ import annotations

from tasks import decontaminate
from tests.unit.test_quality import prose


def test_planted_overlap_is_reported_per_set():
    corpus = [(f"doc{i}", prose(300, i)) for i in range(20)]
    leaked = " ".join(corpus[7][1].split()[40:70])  # 30 words copied from doc7
    sets = {"test": ["Question: " + leaked.upper() + "!", prose(50, 500), "too short"],
            "train": [prose(50, 600), prose(50, 601)]}
    result = decontaminate.report(corpus, sets, n=13)
    assert result["test"] == {"examples": 3, "checked": 2, "contaminated": 1, "share": 0.5,
                              "corpus_docs": ["doc7"], "shown": [sets["test"][0]]}
    assert result["train"]["contaminated"] == 0 and result["train"]["corpus_docs"] == []
