"""Does pretraining give the classifier anything to start from? A linear probe (scikit-learn logistic
regression) on the frozen hidden states of a pretrained model and of the same architecture with random
weights, per layer, pooled two ways: the last token (what LlamaForSequenceClassification's head reads)
and the mean over the tokens. Printed beside TF-IDF + logistic regression on the same split, with 95%
bootstrap intervals. If the pretrained features probe far above the random ones, pretraining learned
something the task can use, and a fine-tune that ends below the random start loses it; if they do not,
the corpus taught the model nothing this task needs.

    .venv/bin/python benchmarks/probe_features.py MODEL_DIR TRAIN.jsonl TEST.jsonl [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.reference_classifier import read_jsonl  # noqa: E402
from tasks import baselines  # noqa: E402


def hidden_features(model, tokenizer, texts: list[str], max_tokens: int) -> dict[str, np.ndarray]:
    """{'last@L' / 'mean@L': (examples, hidden)} for every layer L (0: the embeddings)."""
    features: dict[str, list] = {}
    tokenizer.padding_side = "left"
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            encoded = tokenizer(texts[start:start + 64], truncation=True, max_length=max_tokens, padding=True,
                                return_tensors="pt")
            states = model(**encoded, output_hidden_states=True).hidden_states
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            for layer, state in enumerate(states):
                features.setdefault(f"last@{layer}", []).append(state[:, -1].numpy())
                mean = (state * mask).sum(1) / mask.sum(1)
                features.setdefault(f"mean@{layer}", []).append(mean.numpy())
    return {k: np.concatenate(v) for k, v in features.items()}


def probe(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return classifier.fit(train_x, train_y).predict(test_x)


def accuracy(gold: list[str], predicted) -> str:
    """`0.812 [0.790, 0.833]`: test accuracy and its 95% bootstrap interval."""
    labels = sorted(set(gold))
    resampled = baselines.resampled_classification_scores(gold, {"m": list(predicted)}, labels, 1000)["m"]["accuracy"]
    low, high = baselines.percentile_interval(resampled, 0.95)
    return f"{np.mean(np.asarray(gold) == np.asarray(predicted)):.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    train, test = read_jsonl(args.train), read_jsonl(args.test)
    train_y, test_y = [r["label"] for r in train], [r["label"] for r in test]
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    models = {"pretrained": AutoModel.from_pretrained(str(args.model_dir)),
              "random": AutoModel.from_config(AutoConfig.from_pretrained(str(args.model_dir)))}
    tfidf = baselines.tfidf_logreg([r["text"] for r in train], train_y, [r["text"] for r in test])
    print(f"TF-IDF + logistic regression: {accuracy(test_y, tfidf)}")
    print("| features | " + " | ".join(models) + " |\n|---|" + "---|" * len(models))
    rows: dict[str, list[str]] = {}
    for name, model in models.items():
        model.float().eval()
        train_f = hidden_features(model, tokenizer, [r["text"] for r in train], args.max_tokens)
        test_f = hidden_features(model, tokenizer, [r["text"] for r in test], args.max_tokens)
        for key in train_f:
            rows.setdefault(key, []).append(accuracy(test_y, probe(train_f[key], train_y, test_f[key])))
    for key, cells in rows.items():
        print(f"| {key} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
