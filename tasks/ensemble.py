"""ensemble: the fine-tuned models of several branches of one experiment (e.g. LoRA and full
fine-tuning, or one method with several seeds) as one model, scored beside each member.

Classification: each member's evaluate step wrote its label log-likelihoods of the test examples
(label_scores.json); they become label probabilities (softmax over the candidate labels), are
averaged, and the most probable label is the ensemble's answer.
Generation and chat: the members' models are loaded and decode greedily together, each new token
the argmax of the members' mean next-token log-probabilities, scored like a single model (exact
match, chrF); each member's own scores come from its evaluate report.

Writes report.json with each member's scores beside the ensemble's.

    run(cfg: EnsembleStepConfig, inputs={"taskdata"}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conf.schema import EnsembleStepConfig
from tasks.common import Progress, TaskContext, UserError, write_json
from tasks.evaluate import add_intervals, classic_predictions, classification_scores, generation_metrics, predict
from tasks.taskdata import encode_example, load_labels, load_split


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
    scores = (classification_ensemble if cfg.task.kind == "classification" else generation_ensemble)(cfg, inputs, out_dir, ctx)
    ctx.say("; ".join(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if not k.endswith(("_low", "_high")))
                      for name, s in scores.items()))
    return {f"{name}_{metric}": value for name, s in scores.items() for metric, value in s.items()}


def classification_ensemble(cfg: EnsembleStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    """The members' and the ensemble's scores beside the majority class and TF-IDF + logistic
    regression, with 95% bootstrap intervals and the ensemble's paired differences with those two."""
    labels = load_labels(inputs["taskdata"])
    test = load_split(inputs["taskdata"], "test")[: cfg.eval.max_examples]
    gold = [r["label"] for r in test]
    members = member_probabilities(cfg.member_dirs, labels)
    mean = np.mean(list(members.values()), axis=0)
    predictions = {**classic_predictions(load_split(inputs["taskdata"], "train"), test, cfg),
                   **{name: predict(probs.tolist(), labels) for name, probs in {**members, "ensemble": mean}.items()}}
    scores = {name: classification_scores(gold, predicted, labels) for name, predicted in predictions.items()}
    comparisons = add_intervals(scores, gold, predictions, labels, cfg, model="ensemble")
    write_json(out_dir / "report.json", {"members": list(members), "scores": scores, "comparisons": comparisons,
                                         "ensemble_probabilities": mean.tolist()})
    for name, c in comparisons.items():
        ctx.say(f"ensemble - {name}: accuracy {c['accuracy_delta']:+.3f}, 95% interval "
                f"[{c['low']:+.3f}, {c['high']:+.3f}]: {c['verdict']}")
    # as evaluate names its comparisons (finetuned_vs_<baseline>_delta/_low/_high)
    return scores | {f"ensemble_vs_{name}": {"delta": c["accuracy_delta"], "low": c["low"], "high": c["high"]}
                     for name, c in comparisons.items()}


@torch.no_grad()
def ensemble_generate(models: list, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding on the members' mean next-token log-probabilities (the new tokens, EOS included)."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        batch = torch.tensor([ids])
        mean = torch.stack([torch.log_softmax(m(input_ids=batch).logits[0, -1].float(), dim=-1) for m in models]).mean(0)
        ids.append(int(mean.argmax()))
        if ids[-1] == eos_id:
            break
    return ids[len(prompt_ids):]


def member_models(member_inputs: dict[str, dict[str, str]]) -> tuple[dict, object]:
    """Each member's fine-tuned model (eval mode) and the tokenizer of their shared pretrained model."""
    from transformers import AutoTokenizer

    from tasks.models import load_tuned

    model_dirs = {name: Path(dirs["pretrain"]) / "model" for name, dirs in member_inputs.items()}
    models = {name: load_tuned(Path(dirs["finetune"]), model_dirs[name]).eval() for name, dirs in member_inputs.items()}
    return models, AutoTokenizer.from_pretrained(str(next(iter(model_dirs.values()))))


def generation_ensemble(cfg: EnsembleStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    from tasks.training import quiet_frameworks

    quiet_frameworks()
    torch.set_num_threads(cfg.eval.num_threads)
    test = load_split(inputs["taskdata"], "test")[: cfg.eval.max_examples]
    models, tokenizer = member_models(cfg.member_inputs)
    progress, outputs = Progress(ctx, len(test), "test examples"), []
    for record in test:
        ids, start = encode_example(tokenizer, record, cfg.task, cfg.max_length)
        new = ensemble_generate(list(models.values()), ids[:start], cfg.eval.max_new_tokens, tokenizer.eos_token_id)
        outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        progress.update()
    scores = {name: json.loads((Path(cfg.member_dirs[name]) / "report.json").read_text())["task"]["scores"]["finetuned"]
              for name in models}
    scores["ensemble"] = generation_metrics(outputs, test, cfg.task.kind)
    write_json(out_dir / "report.json", {"members": list(models), "scores": scores,
                                         "examples": [{"gold": r, "ensemble": o} for r, o in zip(test[:5], outputs)]})
    return scores
