"""Baselines as pure functions (tasks/baselines.py): TF-IDF + logistic regression, bootstrap
intervals, and the Kneser-Ney n-gram language model."""
from __future__ import annotations

import numpy as np
import pytest

from tasks import baselines
from tasks.evaluate import unigram_nll


def accuracy(gold, predicted) -> float:
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def topic_texts(num_per_label: int, seed: int) -> tuple[list[str], list[str]]:
    """Sentences whose label is given away by their topic words, among shared filler words."""
    rng = np.random.default_rng(seed)
    topics = {"sport": ["goal", "match", "team", "score"], "food": ["bread", "soup", "cheese", "salad"],
              "weather": ["rain", "storm", "sunny", "cloud"]}
    filler = ["the", "a", "was", "very", "today", "and", "with", "we"]
    texts, labels = [], []
    for label, words in topics.items():
        for _ in range(num_per_label):
            texts.append(" ".join(rng.choice(words, 2).tolist() + rng.choice(filler, 4).tolist()))
            labels.append(label)
    return texts, labels


def markov_rows(num_rows: int, seq_len: int, vocab_size: int, seed: int) -> np.ndarray:
    """Rows of a Markov chain in which each token has 2 likely successors (fixed by the vocabulary)."""
    successors = np.random.default_rng(123).integers(0, vocab_size, size=(vocab_size, 2))
    rng = np.random.default_rng(seed)
    rows = np.empty((num_rows, seq_len), dtype=np.int64)
    rows[:, 0] = rng.integers(0, vocab_size, num_rows)
    for i in range(1, seq_len):
        rows[:, i] = successors[rows[:, i - 1], rng.integers(0, 2, num_rows)]
    return rows


# --- TF-IDF + logistic regression ----------------------------------------------------------------


def test_tfidf_logreg_learns_topic_words():
    train_texts, train_labels = topic_texts(20, seed=0)
    test_texts, test_labels = topic_texts(10, seed=1)
    predicted = baselines.tfidf_logreg(train_texts, train_labels, test_texts)
    assert predicted == test_labels
    assert all(type(label) is str for label in predicted)  # not numpy.str_


def test_tfidf_logreg_rejects_labels_that_do_not_match_texts():
    train_texts, train_labels = topic_texts(5, seed=0)
    with pytest.raises(ValueError):
        baselines.tfidf_logreg(train_texts, train_labels[:-1], ["rain and storm"])
    with pytest.raises(ValueError):  # one class only: nothing to learn
        baselines.tfidf_logreg(train_texts, ["sport"] * len(train_texts), ["rain and storm"])


# --- bootstrap -------------------------------------------------------------------------------------


def noisy_predictions(num_examples: int, error_rate: float, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 4, num_examples)
    wrong = rng.random(num_examples) < error_rate
    return gold.tolist(), np.where(wrong, (gold + 1) % 4, gold).tolist()


LABELS = [0, 1, 2, 3]


def resampled_accuracy(gold, predictions: dict, num_resamples: int, seed: int = 0) -> dict:
    scores = baselines.resampled_classification_scores(gold, predictions, LABELS, num_resamples, seed)
    return {name: metrics["accuracy"] for name, metrics in scores.items()}


def bootstrap_interval(gold, predicted, num_resamples: int, seed: int = 0) -> tuple[float, float]:
    return baselines.percentile_interval(resampled_accuracy(gold, {"m": predicted}, num_resamples, seed)["m"], 0.95)


def paired_difference(gold, a, b, num_resamples: int) -> tuple[float, float, float]:
    scores = resampled_accuracy(gold, {"a": a, "b": b}, num_resamples)
    return (accuracy(gold, a) - accuracy(gold, b), *baselines.percentile_interval(scores["a"] - scores["b"], 0.95))


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_examples():
    widths = []
    for num_examples in (100, 2000):
        gold, predicted = noisy_predictions(num_examples, 0.2, seed=0)
        low, high = bootstrap_interval(gold, predicted, num_resamples=500)
        assert low < accuracy(gold, predicted) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): 20x the examples, ~4.5x narrower


def test_bootstrap_interval_is_reproducible_for_a_seed():
    gold, predicted = noisy_predictions(300, 0.3, seed=1)
    first = bootstrap_interval(gold, predicted, num_resamples=200, seed=5)
    assert first == bootstrap_interval(gold, predicted, num_resamples=200, seed=5)
    assert first != bootstrap_interval(gold, predicted, num_resamples=200, seed=6)


def test_paired_difference_of_a_model_with_itself_is_zero():
    gold, predicted = noisy_predictions(300, 0.3, seed=2)
    assert paired_difference(gold, predicted, predicted, num_resamples=200) == (0, 0, 0)


def test_paired_difference_separates_a_better_model():
    gold, worse = noisy_predictions(1000, 0.3, seed=3)
    better = [g if i % 2 else w for i, (g, w) in enumerate(zip(gold, worse))]  # fixes half of the errors
    difference, low, high = paired_difference(gold, better, worse, num_resamples=300)
    assert difference == pytest.approx(accuracy(gold, better) - accuracy(gold, worse))
    assert 0 < low < difference < high
    assert baselines.verdict(low, high) == "better"


# --- Kneser-Ney ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kneser_ney_distributions_sum_to_one(order):
    vocab_size = 11
    train = np.random.default_rng(0).integers(0, vocab_size - 1, size=(6, 20))  # id 10 never seen
    model = baselines.KneserNey(train, vocab_size, order=order)
    seen = [int(t) for t in train[0, : order - 1]]
    for context in ([], seen, seen[-1:], [10], [10] * (order - 1), [3, 10][: order - 1]):
        distribution = model.distribution(context)
        assert distribution.sum() == pytest.approx(1.0, abs=1e-12)
        assert distribution.min() > 0


def test_kneser_ney_prefers_what_followed_the_context_in_training():
    train = np.array([[1, 2, 3, 1, 2, 3, 1, 2, 4]])
    model = baselines.KneserNey(train, vocab_size=6)
    after_1_2 = model.distribution([1, 2])
    assert after_1_2.argmax() == 3 and after_1_2[3] > after_1_2[4] > after_1_2[5]


def test_kneser_ney_beats_unigram_on_a_markov_chain():
    vocab_size = 200
    train, rows = markov_rows(200, 64, vocab_size, seed=0), markov_rows(8, 64, vocab_size, seed=1)
    kneser_ney = baselines.kneser_ney_nll(train, rows, vocab_size)
    assert kneser_ney < unigram_nll(train, rows, vocab_size) - 3.0  # ~ log 2 against ~ log 200
    assert kneser_ney < np.log(2) + 0.2


def test_kneser_ney_context_stops_at_the_row_start():
    vocab_size = 5
    train = np.array([[0, 1, 2, 3], [4, 1, 0, 3]])
    model = baselines.KneserNey(train, vocab_size)
    # a training row also starts with 0, 1: a context that knew the row start would score 1 differently
    expected = -np.mean(np.log([model.prob(np.array([[0]]), np.array([1]))[0],
                                model.prob(np.array([[0, 1]]), np.array([3]))[0]]))
    assert baselines.kneser_ney_nll(train, np.array([[0, 1, 3]]), vocab_size) == pytest.approx(expected)
