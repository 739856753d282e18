"""baselines: cheap reference models and uncertainty for the numbers the evaluate step reports.

- `tfidf_logreg`: the classic text-classification baseline (word 1-2-gram TF-IDF + logistic
  regression), to put a fine-tuned model's accuracy in context.
- `resampled_classification_scores` / `percentile_interval` / `verdict`: percentile bootstrap over test
  examples (every model on the same resamples), so a score comes with an interval and a comparison
  of two models can say "tie" when the interval of their difference contains 0.
- `kneser_ney_nll` (with the `KneserNey` model behind it): an interpolated Kneser-Ney n-gram language
  model over token ids, scoring the same targets as `tasks.evaluate.unigram_nll` (every token of a
  packed row from position 1 on, context truncated at the row start).

Pure functions, no I/O; scikit-learn is imported only by the function that needs it:

    predicted = tfidf_logreg(train_texts, train_labels, test_texts)
    scores = resampled_classification_scores(gold, {"model": predicted}, labels, num_resamples=1000)
    low, high = percentile_interval(scores["model"]["accuracy"], 0.95)
    nll = kneser_ney_nll(train_rows, val_rows, vocab_size)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def tfidf_logreg(train_texts: list[str], train_labels: list[str], test_texts: list[str], C: float = 10.0,
                 seed: int = 0) -> list[str]:
    """Labels of test_texts predicted by TF-IDF (lowercased word uni+bigrams, sublinear tf) + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    model = Pipeline([("tfidf", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
                      ("logreg", LogisticRegression(C=C, max_iter=2000, random_state=seed))])
    model.fit(train_texts, train_labels)
    # tolist() turns numpy.str_ back into plain str, so predictions compare and serialise like the gold labels
    return model.predict(test_texts).tolist()


# --- bootstrap -------------------------------------------------------------------------------------


def percentile_interval(scores: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2
    low, high = np.quantile(scores, [tail, 1.0 - tail])
    return float(low), float(high)


def resampled_classification_scores(gold: Sequence[str], predictions: dict[str, Sequence[str]], labels: list[str],
                                    num_resamples: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Accuracy and macro-F1 (over `labels`, as tasks.evaluate.classification_scores) of every model on the
    same bootstrap resamples of the test examples, vectorised: {model: {metric: [num_resamples]}}."""
    index = {label: i for i, label in enumerate(labels)}
    code = lambda values: np.asarray([index.get(v, -1) for v in values], dtype=np.int64)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(gold), size=(num_resamples, len(gold)))
    gold_s = code(gold)[samples]
    scores = {}
    for name, predicted in predictions.items():
        pred_s = code(predicted)[samples]
        f1s = []
        for label in range(len(labels)):
            tp = ((gold_s == label) & (pred_s == label)).sum(axis=1)
            fp = ((gold_s != label) & (pred_s == label)).sum(axis=1)
            fn = ((gold_s == label) & (pred_s != label)).sum(axis=1)
            f1s.append(np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0))
        scores[name] = {"accuracy": (gold_s == pred_s).mean(axis=1), "macro_f1": np.mean(f1s, axis=0)}
    return scores


def verdict(low: float, high: float) -> str:
    """'better', 'worse' or 'tie' (the interval of a difference contains 0)."""
    return "better" if low > 0 else "worse" if high < 0 else "tie"


# --- Kneser-Ney n-gram language model ----------------------------------------------------------------


@dataclass
class NgramLevel:
    """The n-grams of one order as sorted int64 keys (base vocab_size + 1), with their counts (raw at the
    highest order, continuation counts below) and, per context, the count total and number of word types."""
    keys: np.ndarray
    counts: np.ndarray
    context_keys: np.ndarray
    context_totals: np.ndarray
    context_types: np.ndarray

    @classmethod
    def from_counts(cls, keys: np.ndarray, counts: np.ndarray, base: int) -> NgramLevel:
        context_keys, starts, types = np.unique(keys // base, return_index=True, return_counts=True)
        return cls(keys, counts.astype(np.float64), context_keys,
                   np.add.reduceat(counts, starts).astype(np.float64), types.astype(np.float64))

    def interpolate(self, context_keys: np.ndarray, words: np.ndarray, lower: np.ndarray, base: int,
                    discount: float) -> np.ndarray:
        """P(word | context) from this order's discounted counts, the held-back mass going to `lower`;
        a context never seen in training backs off to `lower` entirely."""
        counts = lookup(self.keys, self.counts, context_keys * base + words)
        totals = lookup(self.context_keys, self.context_totals, context_keys)
        types = lookup(self.context_keys, self.context_types, context_keys)
        seen = (np.maximum(counts - discount, 0.0) + discount * types * lower) / np.maximum(totals, 1.0)
        return np.where(totals > 0, seen, lower)


def lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[keys == query] for each query, 0 where the key is absent (keys sorted)."""
    index = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[index] == queries, values[index], 0.0)


def ngram_keys(tokens: np.ndarray, base: int) -> np.ndarray:
    """One int64 key per row of `tokens` ([n, k]), the row read as a base-`base` number."""
    keys = np.zeros(len(tokens), dtype=np.int64)
    for column in tokens.T:
        keys = keys * base + column
    return keys


class KneserNey:
    """Interpolated Kneser-Ney over token ids (one discount for all orders; Chen & Goodman 1998).

    Each training row is an independent sequence. Its start counts as one more distinct left
    neighbour (a marker id, vocab_size), so n-grams at a row start still get continuation counts;
    the marker never appears in a context that `prob` scores.
    """

    def __init__(self, train_rows: np.ndarray, vocab_size: int, order: int = 3, discount: float = 0.75):
        if (vocab_size + 1) ** order >= 2**63:
            raise ValueError(f"order {order} n-grams over {vocab_size} ids do not fit the int64 keys; lower the order")
        self.vocab_size, self.order, self.discount = vocab_size, order, discount
        self.base = vocab_size + 1
        rows = np.asarray(train_rows, dtype=np.int64)
        padded = np.concatenate([np.full((len(rows), order - 1), vocab_size, dtype=np.int64), rows], axis=1)
        windows = np.lib.stride_tricks.sliding_window_view(padded, order, axis=1).reshape(-1, order)
        keys, counts = np.unique(ngram_keys(windows, self.base), return_counts=True)
        self.levels = [NgramLevel.from_counts(keys, counts, self.base)]
        for n in range(order - 1, 0, -1):
            # dropping the first token of each distinct (n+1)-gram: counts become numbers of distinct left neighbours
            keys, counts = np.unique(keys % self.base**n, return_counts=True)
            self.levels.insert(0, NgramLevel.from_counts(keys, counts, self.base))

    def prob(self, contexts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """P(tokens[i] | contexts[i]) for contexts of shape [n, k], k < order (k = 0: no context)."""
        contexts, tokens = np.asarray(contexts, dtype=np.int64), np.asarray(tokens, dtype=np.int64)
        p = np.full(len(tokens), 1.0 / self.vocab_size)
        for n in range(contexts.shape[1] + 1):
            context_keys = ngram_keys(contexts[:, contexts.shape[1] - n:], self.base)
            p = self.levels[n].interpolate(context_keys, tokens, p, self.base, self.discount)
        return p

    def distribution(self, context: Sequence[int]) -> np.ndarray:
        """P(w | context) for every id w of the vocabulary."""
        contexts = np.tile(np.asarray(context, dtype=np.int64), (self.vocab_size, 1))
        return self.prob(contexts, np.arange(self.vocab_size))


def kneser_ney_nll(train_rows: np.ndarray, rows: np.ndarray, vocab_size: int, order: int = 3,
                   discount: float = 0.75) -> float:
    """Mean NLL (nats) of every token of `rows` from position 1 on, each predicted from up to order-1
    previous tokens of its own row, by a Kneser-Ney model of `train_rows`."""
    model = KneserNey(train_rows, vocab_size, order, discount)
    rows = np.asarray(rows, dtype=np.int64)
    nll = [-np.log(model.prob(rows[:, max(0, i - order + 1):i], rows[:, i])) for i in range(1, rows.shape[1])]
    return float(np.concatenate(nll).mean())
