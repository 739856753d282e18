"""The optimisation and robustness techniques (issue 8) in the real finetune and evaluate steps on
tiny inputs (one rank, no Ray): early stopping exports the best weights, FGM / regularisation /
augmentation train LoRA and full fine-tuning, and the evaluation reports perturbed inputs and an
int8 copy of the model beside the float one."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conf.schema import AugmentConfig, EarlyStoppingConfig, EvaluateStepConfig, QuantizeConfig, RobustnessConfig
from tasks import evaluate, finetune, models, taskdata, training
from tasks.common import TaskContext
from tests.integration import test_train_steps
from tests.integration.test_train_steps import run_finetune

steps = test_train_steps.steps  # the shared tiny pipeline (a module-scoped fixture)


def exported_val_loss(model, ft, task, dirs) -> float:
    """The training loop's validation loss (same batches, weighting and precision) of an exported model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dirs["pretrain"] / "model")
    val = taskdata.load_split(dirs["taskdata"], "val")
    examples = [taskdata.encode_example(tokenizer, r, task, ft.max_length) for r in val]
    total = count = 0.0
    with torch.no_grad():
        for rows in training.eval_row_slices(len(examples), ft, 0, 1):
            batch = finetune.collate([examples[i] for i in rows], tokenizer.pad_token_id)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            total, count = total + loss.item() * batch["weight"], count + batch["weight"]
    return total / count


def test_early_stopping_exports_the_weights_of_the_best_validation(steps, tmp_path):
    cfg, dirs, _ = steps
    # A learning rate this high makes validation jump up and down: training stops at the first
    # validation that is worse than the best one (patience 1).
    ft, metrics = run_finetune(cfg, dirs, tmp_path / "ft", method="full", precision="fp32", lr=0.03, warmup_steps=0,
                               max_steps=8, eval_every=1, eval_batches=2, grad_clip=0.0, objective="lm",
                               early_stopping=EarlyStoppingConfig(patience=1, metric="val_loss"))
    assert metrics["best_step"] < metrics["last_step"] <= 8
    assert metrics["last_step"] == 8 or metrics["last_step"] - metrics["best_step"] == 1
    log = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, metrics["last_step"] + 1))
    assert min(r["val_loss"] for r in log) == pytest.approx(metrics["best_val_loss"])
    exported = models.load_base_model(tmp_path / "ft" / "model").eval()
    assert exported_val_loss(exported, ft, cfg.task, dirs) == pytest.approx(metrics["best_val_loss"], rel=1e-5)
    assert metrics["final_val_loss"] != pytest.approx(metrics["best_val_loss"], rel=1e-4)
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_early_stopping_on_validation_accuracy(steps, tmp_path):
    cfg, dirs, _ = steps
    _, metrics = run_finetune(cfg, dirs, tmp_path / "ft", max_steps=2, eval_every=1,
                              early_stopping=EarlyStoppingConfig(patience=1, metric="val_accuracy"))
    assert 0 <= metrics["best_val_accuracy"] <= 1 and metrics["best_step"] in (1, 2)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fgm_regularisation_and_augmentation_train(steps, tmp_path, method):
    cfg, dirs, _ = steps
    plain = dict(method=method, precision="fp32", max_steps=2)
    run_finetune(cfg, dirs, tmp_path / "plain", **plain)
    _, metrics = run_finetune(cfg, dirs, tmp_path / "tuned", **plain, adversarial_epsilon=1.0, label_smoothing=0.1,
                              hidden_dropout=0.1, attention_dropout=0.1, augment=AugmentConfig(copies=1))
    assert metrics["augmented_examples"] == len(taskdata.load_split(dirs["taskdata"], "train"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
              for name in ("plain", "tuned")]
    assert all(torch.isfinite(torch.tensor(losses[1]))) and losses[0] != pytest.approx(losses[1], rel=1e-3)
    assert metrics["final_val_loss"] > 0


@pytest.mark.parametrize("objective", ["classifier", "lm"])
def test_evaluate_reports_perturbed_inputs_and_an_int8_model(steps, tmp_path, objective):
    cfg, dirs, _ = steps
    ft, _ = run_finetune(cfg, dirs, tmp_path / "ft", method="lora", objective=objective)
    eval_cfg = dataclasses.replace(cfg.eval, robustness=RobustnessConfig(perturbations=["typos", "casing", "deleted_words"]),
                                   quantize=QuantizeConfig(enabled=True, sparsity=0.5))
    out = tmp_path / "evaluate"
    out.mkdir()
    inputs = {"tokenize": dirs["tokenize"], "pretrain": dirs["pretrain"], "taskdata": dirs["taskdata"],
              "finetune": tmp_path / "ft"}
    metrics = evaluate.run(EvaluateStepConfig(eval_cfg, cfg.task, ft.max_length), inputs, out, TaskContext("evaluate"))
    for name in ("typos", "casing", "deleted_words"):
        assert 0 <= metrics[f"robust_{name}_accuracy"] <= 1
    assert 0 < metrics["int8_mb"] < metrics["served_mb"] and (out / "quantized" / "model_int8.pt").is_file()
    assert metrics["int8_tokens_per_s"] > 0 and metrics["served_tokens_per_s"] > 0
    # a language model's int8 copy also gets a perplexity; a classifier's is judged by its task metrics
    assert metrics["int8_ppl"] > 1 if objective == "lm" else "int8_ppl" not in metrics
    assert metrics["int8_accuracy_delta"] == pytest.approx(metrics["int8_accuracy"] - metrics["finetuned_accuracy"])
    scores = json.loads((out / "label_scores.json").read_text())
    assert len(scores["scores"]) == min(cfg.eval.max_examples, len(taskdata.load_split(dirs["taskdata"], "test")))
    assert scores["labels"] == taskdata.load_labels(dirs["taskdata"])


def test_early_stopping_survives_a_stop_and_resume(steps, tmp_path):
    """Stopped (a stop request, as SIGTERM makes) after step 2 and resumed: the same best step, stop and exported weights."""
    from safetensors.torch import load_file

    from conf.schema import FinetuneStepConfig
    from tasks.common import StopFlag

    cfg, dirs, _ = steps
    settings = dict(method="full", precision="fp32", lr=0.03, warmup_steps=0, max_steps=8, eval_every=1, eval_batches=2,
                    grad_clip=0.0, checkpoint_every=2, log_every=1,
                    early_stopping=EarlyStoppingConfig(patience=2, metric="val_loss"))
    _, whole = run_finetune(cfg, dirs, tmp_path / "whole", **settings)
    (tmp_path / "resumed").mkdir()
    ft = dataclasses.replace(cfg.finetune, **settings)
    inputs = {"pretrain": dirs["pretrain"], "taskdata": dirs["taskdata"]}
    first = finetune.train_worker(FinetuneStepConfig(ft, cfg.task), inputs, tmp_path / "resumed",
                                  TaskContext("finetune", stop=StopFlag(asked=True)))
    assert first == {"stopped_at_step": 1}
    again = finetune.train_worker(FinetuneStepConfig(ft, cfg.task), inputs, tmp_path / "resumed", TaskContext("finetune"))
    assert {k: again[k] for k in ("best_step", "last_step", "best_val_loss")} == \
        {k: whole[k] for k in ("best_step", "last_step", "best_val_loss")}
    weights = [load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("whole", "resumed")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
