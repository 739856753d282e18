"""Text-level changes of task records: seeded augmentation of fine-tuning data (random deletion,
swap and insertion of words, synonym replacement from a lexicon) and the perturbations of the
robustness check (typos, casing, deleted words). Only the input field changes, never the target.

    augment_records(records, cfg: AugmentConfig, kind) -> records + augmented copies
    perturb_records(records, name, rate, seed, kind) -> perturbed copies
"""
from __future__ import annotations

import collections
import json
import random
from pathlib import Path

from conf.schema import AugmentConfig
from tasks.common import UserError
from tasks.taskdata import FIELDS, record_key

# Neighbouring keys (QWERTY) for typos: the mistakes people make.
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
NEIGHBOURS = {c: row[max(i - 1, 0): i] + row[i + 1: i + 2] for row in KEYBOARD_ROWS for i, c in enumerate(row)}


def input_field(kind: str) -> str:
    if kind == "chat":
        raise UserError("finetune.augment / eval.robustness: text changes need task.kind classification or generation")
    return FIELDS[kind][0]


def record_rng(seed: int, record: dict, salt: str) -> random.Random:
    """A generator fixed by the seed and the record's content: the same copy whatever the order."""
    return random.Random(f"{seed}:{salt}:{record_key(record)}")


def build_lexicon(texts: list[str], max_synonyms: int = 5, min_shared: int = 2) -> dict[str, list[str]]:
    """Distributional synonyms: words that occur between the same left and right words at least
    `min_shared` times (in code: names used in the same places)."""
    fillers = collections.defaultdict(collections.Counter)
    for text in texts:
        words = text.split()
        for left, middle, right in zip(words, words[1:], words[2:]):
            fillers[(left, right)][middle] += 1
    shared = collections.defaultdict(collections.Counter)
    for counter in fillers.values():
        if 1 < len(counter) <= 50:  # a context with hundreds of fillers says nothing
            for a in counter:
                for b in counter:
                    if a != b:
                        shared[a][b] += 1
    return {word: sorted(b for b, n in counts.most_common(max_synonyms) if n >= min_shared)
            for word, counts in sorted(shared.items()) if counts.most_common(1)[0][1] >= min_shared}


def load_lexicon(cfg: AugmentConfig, texts: list[str]) -> dict[str, list[str]]:
    if cfg.lexicon_path is None:
        return build_lexicon(texts)
    try:
        lexicon = json.loads(Path(cfg.lexicon_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"finetune.augment.lexicon_path: cannot read '{cfg.lexicon_path}': {error}") from None
    if not isinstance(lexicon, dict) or not all(isinstance(v, list) for v in lexicon.values()):
        raise UserError("finetune.augment.lexicon_path: must hold a JSON object {word: [synonyms]}")
    return {str(k): [str(s) for s in v] for k, v in lexicon.items() if v}


def augment_text(text: str, cfg: AugmentConfig, lexicon: dict, rng: random.Random) -> str:
    """One augmented copy (EDA): synonym replacement, insertion, swap, deletion; never empty."""
    words = [rng.choice(lexicon[w]) if w in lexicon and rng.random() < cfg.p_synonym else w for w in text.split()]
    for _ in range(round(len(words) * cfg.p_insert)):
        source = rng.choice(words)
        words.insert(rng.randrange(len(words) + 1), rng.choice(lexicon.get(source, [source])))
    for _ in range(round(len(words) * cfg.p_swap)):
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    kept = [w for w in words if rng.random() >= cfg.p_delete]
    return " ".join(kept or [rng.choice(words)])


def augment_records(records: list[dict], cfg: AugmentConfig, kind: str) -> list[dict]:
    """The records followed by cfg.copies augmented copies of each (seeded)."""
    if cfg.copies == 0:
        return records
    name = input_field(kind)
    lexicon = load_lexicon(cfg, [r[name] for r in records])
    copies = []
    for record in records:
        rng = record_rng(cfg.seed, record, "augment")
        copies += [{**record, name: augment_text(record[name], cfg, lexicon, rng)} for _ in range(cfg.copies)]
    return records + copies


def typo(word: str, rng: random.Random) -> str:
    letters = [i for i, c in enumerate(word) if c.lower() in NEIGHBOURS]
    if not letters:
        return word
    i = rng.choice(letters)
    replacement = rng.choice(NEIGHBOURS[word[i].lower()])
    return word[:i] + (replacement.upper() if word[i].isupper() else replacement) + word[i + 1:]


PERTURBATIONS = {
    "typos": lambda word, rng: typo(word, rng),
    "casing": lambda word, rng: word.swapcase(),
    "deleted_words": lambda word, rng: "",
}


def perturb_text(text: str, name: str, rate: float, rng: random.Random) -> str:
    """Each word changed with probability `rate`; line structure (indentation) kept."""
    lines = []
    for line in text.split("\n"):
        indent = line[: len(line) - len(line.lstrip())]
        words = [PERTURBATIONS[name](w, rng) if rng.random() < rate else w for w in line.split()]
        lines.append(indent + " ".join(w for w in words if w))
    return "\n".join(lines)


def perturb_records(records: list[dict], name: str, rate: float, seed: int, kind: str) -> list[dict]:
    field = input_field(kind)
    return [{**r, field: perturb_text(r[field], name, rate, record_rng(seed, r, name)) or r[field]} for r in records]
