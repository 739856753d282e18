"""ensemble: the fine-tuned models of several branches of one experiment (e.g. LoRA and full
fine-tuning, or one method with several seeds) as one classifier. Each member's evaluate step
wrote its label log-likelihoods of the test examples (label_scores.json); they become label
probabilities (softmax over the candidate labels), are averaged, and the most probable label is
the ensemble's answer. Writes report.json with each member's scores beside the ensemble's.

    run(cfg: EnsembleStepConfig, inputs={"taskdata"}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conf.schema import EnsembleStepConfig
from tasks.common import TaskContext, UserError, write_json
from tasks.evaluate import classification_scores, predict
from tasks.taskdata import load_labels, load_split


def label_probabilities(scores: list[list[float]]) -> np.ndarray:
    """Softmax of each example's label log-likelihoods over the candidate labels."""
    logits = np.asarray(scores, dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def member_probabilities(member_dirs: dict[str, str], labels: list[str]) -> dict[str, np.ndarray]:
    members = {}
    for name, directory in member_dirs.items():
        saved = json.loads((Path(directory) / "label_scores.json").read_text())
        if saved["labels"] != labels:
            raise UserError(f"eval.ensemble: member '{name}' was scored on other labels")
        members[name] = label_probabilities(saved["scores"])
    return members


def run(cfg: EnsembleStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    labels = load_labels(inputs["taskdata"])
    gold = [r["label"] for r in load_split(inputs["taskdata"], "test")[: cfg.eval.max_examples]]
    members = member_probabilities(cfg.member_dirs, labels)
    mean = np.mean(list(members.values()), axis=0)
    scores = {name: classification_scores(gold, predict(probs.tolist(), labels), labels)
              for name, probs in {**members, "ensemble": mean}.items()}
    write_json(out_dir / "report.json", {"members": list(members), "scores": scores,
                                         "ensemble_probabilities": mean.tolist()})
    ctx.say("; ".join(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()) for name, s in scores.items()))
    return {f"{name}_{metric}": value for name, s in scores.items() for metric, value in s.items()}
