"""A bare Hugging Face sequence-classification loop (no Ray, no DeepSpeed, no lmforge code): the
reference that the pipeline's finetune step is checked against (issue 15). If this learns a task
and the step does not, the step has a defect; if neither does, the cause is the model or the data.

AutoModelForSequenceClassification on a pretrained directory (or the same architecture from random
initialisation), the raw text cut at --max-tokens, AdamW with linear warm-up and decay, a fixed
number of epochs, test accuracy after each epoch.

    .venv/bin/python benchmarks/reference_classifier.py MODEL_DIR TRAIN.jsonl TEST.jsonl [--lr 5e-4]
        [--epochs 3] [--batch-size 32] [--max-tokens 64] [--init pretrained|random] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MeanPooled(torch.nn.Module):
    """The sequence classifier's body and head, the head applied to the mean hidden state over the tokens."""

    def __init__(self, classifier):
        super().__init__()
        self.body, self.head = classifier.model, classifier.score

    def forward(self, input_ids, attention_mask):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return type("Output", (), {"logits": self.head((hidden * mask).sum(1) / mask.sum(1))})


def reference_loop(model_dir: Path, train: list[dict], test: list[dict], lr: float = 5e-4, epochs: int = 3,
                   batch_size: int = 32, max_tokens: int = 64, init: str = "pretrained", seed: int = 0,
                   threads: int = 2, pooling: str = "last") -> list[float]:
    """Test accuracy after each epoch. pooling='mean': a linear head on the mean of the last hidden
    states over the tokens, instead of the last token's (LlamaForSequenceClassification's)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    labels = sorted({r["label"] for r in train})
    index = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    head = {"num_labels": len(labels), "pad_token_id": tokenizer.pad_token_id}
    if init == "random":
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(model_dir), **head))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), **head)
    model = model.float()
    if pooling == "mean":
        model = MeanPooled(model)

    def batch(records: list[dict]) -> dict:
        encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=max_tokens, padding=True,
                            return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    generator = torch.Generator().manual_seed(seed)
    accuracies = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            rows = [train[i] for i in order[start : start + batch_size]]
            targets = torch.tensor([index[r["label"]] for r in rows])
            loss = torch.nn.functional.cross_entropy(model(**batch(rows)).logits, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        model.eval()
        right = 0
        with torch.no_grad():
            for start in range(0, len(test), 64):
                rows = test[start : start + 64]
                predicted = model(**batch(rows)).logits.argmax(-1).tolist()
                right += sum(labels[p] == r["label"] for p, r in zip(predicted, rows))
        accuracies.append(right / len(test))
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pooling", choices=["last", "mean"], default="last")
    args = parser.parse_args()
    started = time.monotonic()
    accuracies = reference_loop(args.model_dir, read_jsonl(args.train), read_jsonl(args.test), args.lr, args.epochs,
                                args.batch_size, args.max_tokens, args.init, args.seed, pooling=args.pooling)
    print(json.dumps({"init": args.init, "pooling": args.pooling, "lr": args.lr, "accuracy_per_epoch": [round(a, 4) for a in accuracies],
                      "seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
