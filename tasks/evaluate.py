"""evaluate: perplexity against unigram and Kneser-Ney n-gram baselines, the task metric of the
fine-tuned model against the majority class, TF-IDF + logistic regression, the untuned and the
zero-shot model, and sample generations. Writes report.json, and for classification the fine-tuned
model's label scores (label_scores.json, for ensembles).

Every classification metric comes with a 95% bootstrap interval (<metric>_low/_high), and the
fine-tuned model's accuracy is compared with each baseline on the same resamples (paired): the
difference, its interval and a verdict (better, worse, or a tie when the interval holds 0); a
model that does not beat a baseline, or a pretrained model no better than the n-gram, is warned about.

Options: the task metric on perturbed test inputs (eval.robustness, metrics robust_<name>_*), and
a pruned/int8 copy of the model (eval.quantize, metrics int8_*), with size on disk and tokens/s
of the served float model (served_mb, served_tokens_per_s) always reported.

A classification head is scored by the log-softmax of its logits (batched). A language model is
scored by label likelihood (tasks/labelscore.py): each example's prompt once, then every candidate
(" label" + EOS) in one sequence whose attention mask keeps the candidates apart, examples batched
with right padding, so a score never depends on the evaluation batch size; ties go to the first
label in sorted order. The fine-tuned perplexity of a classifier is that of its decoder under the
pretrained output head: it shows whether fine-tuning kept the language model.

    run(cfg: EvaluateStepConfig, inputs={"tokenize", "pretrain", "taskdata", "finetune"[, "control"]}, out_dir, ctx)
"""
from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from conf.schema import EvaluateStepConfig, TaskConfig
from tasks import quantize
from tasks.augment import perturb_records
from tasks.common import Progress, TaskContext, write_json, write_jsonl
from tasks import baselines
from tasks.finetune import class_example, collate_classes
from tasks.labelscore import can_pack, label_log_likelihoods, packed_label_log_likelihoods
from tasks.models import is_classifier, load_base_model, load_tuned, tuned_language_model
from tasks.taskdata import encode_example, load_labels, load_split, render, target_of
from tasks.tokenize import load_split as load_tokens
from tasks.training import quiet_frameworks


@torch.no_grad()
def token_nll(model, rows: np.ndarray, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over rows of equal length."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids = torch.from_numpy(np.asarray(rows[start : start + batch_size], dtype=np.int64))
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + nll.item(), count + ids[:, 1:].numel()
    return total / count


def unigram_nll(train_rows: np.ndarray, rows: np.ndarray, vocab_size: int) -> float:
    """The same targets as `token_nll`, predicted by add-one-smoothed training-set token frequencies."""
    counts = np.bincount(np.asarray(train_rows).reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(rows)[:, 1:].astype(np.int64)].mean())


CONTENT_FREE = ("N/A", "", "[MASK]")
"""Inputs that carry no content: what the model predicts for them is its label prior under the prompt
(contextual calibration, Zhao et al. 2021)."""


def likelihood_variants(model, tokenizer, summed: list[list[float]], labels: list[str], task: TaskConfig,
                        max_length: int) -> dict[str, list[list[float]]]:
    """Two more readings of label log-likelihoods: 'lengthnorm' (per token, so a label that costs more
    tokens is not penalised for it) and 'calibrated' (the label probabilities divided by those of
    content-free inputs, so the prompt's prior for a label does not decide)."""
    lengths = np.asarray([len(tokenizer.encode(" " + label, add_special_tokens=False)) + 1 for label in labels])
    summed = np.asarray(summed, dtype=np.float64)
    field = "text" if task.kind == "classification" else "prompt"
    prior = np.mean([softmax_rows(np.asarray([label_log_likelihoods(model, tokenizer, {field: text, "label": labels[0]},
                                                                    labels, task, max_length)]))[0]
                     for text in CONTENT_FREE], axis=0)
    calibrated = np.log(softmax_rows(summed)) - np.log(prior)
    return {"lengthnorm": (summed / lengths).tolist(), "calibrated": calibrated.tolist()}


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def classification_scores(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
    f1s = []
    for label in labels:
        tp = sum(g == p == label for g, p in zip(gold, predicted))
        fp = sum(p == label != g for g, p in zip(gold, predicted))
        fn = sum(g == label != p for g, p in zip(gold, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


@torch.no_grad()
def head_log_probs(model, tokenizer, records: list[dict], labels: list[str], task: TaskConfig, max_length: int,
                   progress: Progress, batch_size: int = 16) -> list[list[float]]:
    """Log-softmax of a classification head's logits (in `labels` order) for each record, in batches."""
    index = {label: i for i, label in enumerate(labels)}
    scores = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = collate_classes([class_example(tokenizer, r, task, max_length, index) for r in chunk],
                                tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        scores.extend(torch.log_softmax(logits, dim=-1).tolist())
        progress.update(len(chunk))
    return scores


def classify(model, tokenizer, records: list[dict], labels: list[str], task: TaskConfig, max_length: int,
             progress: Progress) -> list[list[float]]:
    """Each record's label scores (predict() turns them into labels): a classification head's label
    log-probabilities, or else each label's log-likelihood after the prompt."""
    if is_classifier(model):
        return head_log_probs(model, tokenizer, records, labels, task, max_length, progress)
    if can_pack(model):
        return packed_label_log_likelihoods(model, tokenizer, records, labels, task, max_length, progress)
    scores = []
    for record in records:
        scores.append(label_log_likelihoods(model, tokenizer, record, labels, task, max_length))
        progress.update()
    return scores


def predict(scores: list[list[float]], labels: list[str]) -> list[str]:
    """The most likely label of each example; ties go to the first label."""
    return [labels[int(np.argmax(s))] for s in scores]


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def generation_scores(model, tokenizer, records: list[dict], task: TaskConfig, max_length: int,
                      max_new_tokens: int, progress: Progress) -> tuple[dict, list[str]]:
    outputs = []
    for record in records:
        ids, start = encode_example(tokenizer, record, task, max_length)
        outputs.append(tokenizer.decode(generate(model, tokenizer, ids[:start], max_new_tokens),
                                        skip_special_tokens=True).strip())
        progress.update()
    return generation_metrics(outputs, records, task.kind), outputs


def generation_metrics(outputs: list[str], records: list[dict], kind: str) -> dict:
    """Exact match and corpus chrF of generated answers against the records' targets."""
    from sacrebleu.metrics import CHRF

    gold = [target_of(r, kind).strip() for r in records]
    chrf = CHRF().corpus_score(outputs, [gold]).score
    return {"exact_match": sum(o == g for o, g in zip(outputs, gold)) / len(gold), "chrf": chrf}


def scoring_runs(models: dict, test: list[dict], cfg: EvaluateStepConfig) -> list[tuple[str, object, TaskConfig, list]]:
    """(name, model, task config, test records) of every scoring run: the models, then the fine-tuned
    model on each perturbation of the test inputs (robustness)."""
    robust = cfg.eval.robustness
    runs = [(name, model, cfg.task, test) for name, model in models.items()]
    return runs + [(f"robust_{name}", models["finetuned"], cfg.task,
                    perturb_records(test, name, robust.rate, robust.seed, cfg.task.kind)) for name in robust.perturbations]


def task_metrics(models: dict, tokenizer, cfg: EvaluateStepConfig, inputs: dict, max_length: int,
                 ctx: TaskContext) -> tuple[dict, list[dict], dict]:
    """Scores per model, examples, and each model's label log-likelihoods (classification)."""
    task = cfg.task
    test = load_split(inputs["taskdata"], "test")[: cfg.eval.max_examples]
    runs = scoring_runs(models, test, cfg)
    progress = Progress(ctx, len(test) * (len(runs) + (task.kind == "classification")), "test examples")
    results, predictions, label_scores = {}, {}, {}
    if task.kind == "classification":
        labels = load_labels(inputs["taskdata"])
        gold = [r["label"] for r in test]
        predictions.update(classic_predictions(load_split(inputs["taskdata"], "train"), test, cfg))
        # zero-shot: the untuned model, told the candidate labels in its prompt
        zero_shot = dataclasses.replace(task, prompt_template=task.zero_shot_template.replace("{labels}", ", ".join(labels)))
        for name, model, prompt, records in runs + [("zero_shot", models["untuned"], zero_shot, test)]:
            label_scores[name] = classify(model, tokenizer, records, labels, prompt, max_length, progress)
            predictions[name] = predict(label_scores[name], labels)
        if not is_classifier(models["finetuned"]):  # label likelihood, also length-normalised and calibrated
            for variant, scores in likelihood_variants(models["finetuned"], tokenizer, label_scores["finetuned"], labels,
                                                       task, max_length).items():
                predictions[variant] = predict(scores, labels)
        results = {name: classification_scores(gold, predicted, labels) for name, predicted in predictions.items()}
        comparisons = add_intervals(results, gold, predictions, labels, cfg)
        task_report = {"num_examples": len(test), "scores": results, "comparisons": comparisons}
    else:
        for name, model, _, records in runs:
            results[name], predictions[name] = generation_scores(
                model, tokenizer, records, task, max_length, cfg.eval.max_new_tokens, progress)
        task_report = {"num_examples": len(test), "scores": results}
    examples = [{"input": render(r, task)[1][-300:], "gold": target_of(r, task.kind),
                 **{f"{n}_prediction": predictions[n][i] for n in predictions}}
                for i, r in enumerate(test[: max(cfg.eval.num_samples, 5)])]
    return task_report, examples, label_scores


def classic_predictions(train: list[dict], test: list[dict], cfg) -> dict[str, list[str]]:
    """The majority class and the classic baseline a model must beat to be worth it (TF-IDF + logistic
    regression), trained on the train split and predicting the test split; cfg: an evaluate or
    ensemble step's config (eval.tfidf_c, task.seed)."""
    majority = collections.Counter(r["label"] for r in train).most_common(1)[0][0]
    return {"majority": [majority] * len(test),
            "tfidf_logreg": baselines.tfidf_logreg([r["text"] for r in train], [r["label"] for r in train],
                                                   [r["text"] for r in test], C=cfg.eval.tfidf_c, seed=cfg.task.seed)}


COMPARED = ("majority", "tfidf_logreg", "no_pretraining", "untuned", "zero_shot")
"""The baselines the fine-tuned model is compared with, paired on the same resamples."""


def add_intervals(results: dict, gold: list[str], predictions: dict, labels: list[str],
                  cfg, model: str = "finetuned") -> dict:
    """95% bootstrap intervals (<metric>_low/_high) into each model's scores; returns `model`'s accuracy
    difference with each baseline, its interval and verdict (a tie when it holds 0). cfg: an evaluate
    or ensemble step's config (eval.bootstrap_resamples, task.seed)."""
    if not cfg.eval.bootstrap_resamples:
        return {}
    resampled = baselines.resampled_classification_scores(gold, predictions, labels, cfg.eval.bootstrap_resamples,
                                                          seed=cfg.task.seed)
    for name, metrics in resampled.items():
        for metric, values in metrics.items():
            low, high = baselines.percentile_interval(values, 0.95)
            results[name].update({f"{metric}_low": low, f"{metric}_high": high})
    comparisons = {}
    for name in COMPARED:
        if name in results and model in results:
            low, high = baselines.percentile_interval(
                resampled[model]["accuracy"] - resampled[name]["accuracy"], 0.95)
            delta = results[model]["accuracy"] - results[name]["accuracy"]
            comparisons[name] = {"accuracy_delta": delta, "low": low, "high": high,
                                 "verdict": baselines.verdict(low, high)}
    return comparisons


def serving_costs(cfg: EvaluateStepConfig, finetune_dir: Path, model_dir: Path, rows: np.ndarray,
                  out_dir: Path) -> tuple[dict, dict]:
    """Size and tokens/s of the served float model, and with eval.quantize its pruned/int8 copy
    (saved under quantized/, reloaded from there); returns (metrics, {"int8": model} or {})."""
    served = quantize.served_model(finetune_dir, model_dir)
    metrics = {"served_mb": quantize.state_dict_bytes(served, out_dir / ".float.pt") / 1e6}
    models = {"served": served}
    if cfg.eval.quantize.enabled:
        pruned = quantize.served_model(finetune_dir, model_dir)
        if cfg.eval.quantize.sparsity:
            quantize.prune_magnitude(pruned, cfg.eval.quantize.sparsity)
        models["int8"] = quantize.save_and_reload(quantize.quantize(pruned), quantize.served_model(finetune_dir, model_dir),
                                                  out_dir / "quantized")
        metrics["int8_mb"] = (out_dir / "quantized" / quantize.INT8_FILE).stat().st_size / 1e6
        if not is_classifier(models["int8"]):  # a classifier's int8 copy is judged by its task metrics
            metrics["int8_ppl"] = math.exp(token_nll(models["int8"], rows))
    metrics.update({f"{name}_tokens_per_s": value for name, value in quantize.tokens_per_second(models, rows).items()})
    return metrics, {"int8": models["int8"]} if "int8" in models else {}


def run(cfg: EvaluateStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    from transformers import AutoTokenizer

    quiet_frameworks()
    torch.set_num_threads(cfg.eval.num_threads)
    model_dir = Path(inputs["pretrain"]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = load_base_model(model_dir).eval()
    tuned = load_tuned(Path(inputs["finetune"]), model_dir).eval()
    max_length = cfg.max_length

    tokens_dir = Path(inputs["tokenize"])
    train_rows, val_rows = load_tokens(tokens_dir, "train"), load_tokens(tokens_dir, "val")[: cfg.eval.ppl_batches]
    nll = {"unigram": unigram_nll(train_rows, val_rows, len(tokenizer))}
    if cfg.eval.ngram_order:  # a smoothed n-gram over the same tokens: what pretraining must beat
        nll[f"ngram{cfg.eval.ngram_order}"] = baselines.kneser_ney_nll(train_rows, val_rows, len(tokenizer),
                                                                     order=cfg.eval.ngram_order)
    nll["pretrained"] = token_nll(base, val_rows)
    # a classifier's decoder under the pretrained LM head: did fine-tuning keep the language model?
    nll["finetuned"] = token_nll(tuned_language_model(Path(inputs["finetune"]), model_dir, tuned), val_rows)
    perplexity = {name: math.exp(value) for name, value in nll.items()}
    ctx.say("validation perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in perplexity.items()))

    costs, int8 = serving_costs(cfg, Path(inputs["finetune"]), model_dir, val_rows, out_dir)
    # the no-pretraining control (eval.no_pretraining): the same fine-tuning from random initialisation
    control = {"no_pretraining": load_tuned(Path(inputs["control"]), model_dir).eval()} if "control" in inputs else {}
    task, examples, label_scores = task_metrics({"untuned": base, "finetuned": tuned, **control, **int8}, tokenizer,
                                                cfg, inputs, max_length, ctx)
    if cfg.task.kind == "classification":  # what an ensemble step averages
        write_json(out_dir / "label_scores.json", {"labels": load_labels(inputs["taskdata"]),
                                                   "scores": label_scores["finetuned"]})
    samples = []
    for row in val_rows[: cfg.eval.num_samples]:
        prompt = [int(t) for t in row[: cfg.eval.sample_prompt_tokens]]
        samples.append({"prompt": tokenizer.decode(prompt),
                        "continuation": tokenizer.decode(generate(base, tokenizer, prompt, cfg.eval.max_new_tokens))})
    report = {"perplexity": perplexity, "nll": nll, "task": task, "task_kind": cfg.task.kind, "serving": costs,
              "task_examples": examples, "samples": samples}
    write_json(out_dir / "report.json", report)
    write_jsonl(out_dir / "samples.jsonl", samples + examples)
    metrics = {f"ppl_{k}": v for k, v in perplexity.items()}
    for model_name, scores in task["scores"].items():
        metrics.update({f"{model_name}_{metric}": value for metric, value in scores.items()})
    metrics.update(costs)
    metrics.update({f"int8_{m}_delta": v - task["scores"]["finetuned"][m] for m, v in task["scores"].get("int8", {}).items()
                    if not m.endswith(("_low", "_high"))})
    for name, comparison in task.get("comparisons", {}).items():
        metrics.update({f"finetuned_vs_{name}_delta": comparison["accuracy_delta"],
                        f"finetuned_vs_{name}_low": comparison["low"], f"finetuned_vs_{name}_high": comparison["high"]})
    ctx.say(f"task ({task['num_examples']} test examples): " + "; ".join(
        f"{m} " + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if not k.endswith(("_low", "_high")))
        for m, s in task["scores"].items()))
    for warning in quality_warnings(task, perplexity):
        ctx.say(f"warning: {warning}")
    return metrics


def quality_warnings(task: dict, perplexity: dict) -> list[str]:
    """What says the model is not worth it: a fine-tuned classifier that does not beat a baseline
    (paired bootstrap: worse, or a tie), a pretrained model no better than the n-gram baseline."""
    warnings = [f"the fine-tuned model does not beat {name} (accuracy {c['accuracy_delta']:+.3f}, 95% interval "
                f"[{c['low']:+.3f}, {c['high']:+.3f}]: {c['verdict']})"
                for name, c in task.get("comparisons", {}).items() if c["verdict"] != "better"]
    ngram = next((v for k, v in perplexity.items() if k.startswith("ngram")), None)
    if ngram is not None and perplexity["pretrained"] >= ngram:
        warnings.append(f"the pretrained model's perplexity ({perplexity['pretrained']:.1f}) is no better than the "
                        f"n-gram baseline's ({ngram:.1f})")
    return warnings
