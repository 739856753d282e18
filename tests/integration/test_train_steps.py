"""pretrain, finetune and evaluate for real on tiny inputs, in this process (one rank, no Ray):
DeepSpeed ZeRO, the Hugging Face export, PEFT adapters and the evaluation report."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conf.schema import EvaluateStepConfig, FinetuneStepConfig, PretrainStepConfig
from tasks import evaluate, finetune, ingest, labelscore, models, pretrain, taskdata, tokenize
from tasks.common import TaskContext


@pytest.fixture(scope="module")
def steps(tmp_path_factory, single_rank):
    from tests.conftest import compose_config

    root = tmp_path_factory.mktemp("train")
    cfg = compose_config(["+experiment=tiny", "pretrain.num_workers=1", "pretrain.cpus_per_worker=2"])
    dirs = {name: root / name for name in ("ingest", "tokenize", "pretrain", "taskdata")}
    for d in dirs.values():
        d.mkdir()
    ctx = lambda name: TaskContext(name)
    ingest.run(cfg.data, {}, dirs["ingest"], ctx("ingest"))
    tokenize.run(cfg.tokenizer, {"ingest": dirs["ingest"]}, dirs["tokenize"], ctx("tokenize"))
    metrics = pretrain.train_worker(PretrainStepConfig(cfg.model, cfg.pretrain), {"tokenize": dirs["tokenize"]},
                                    dirs["pretrain"], ctx("pretrain"))
    taskdata.run(cfg.task, {}, dirs["taskdata"], ctx("taskdata"))
    return cfg, dirs, metrics


def run_finetune(cfg, dirs, out_dir, **changes):
    """Fine-tune with cfg.finetune changed by `changes`; returns (finetune config, metrics)."""
    out_dir.mkdir()
    ft = dataclasses.replace(cfg.finetune, **changes)
    inputs = {"pretrain": dirs["pretrain"], "taskdata": dirs["taskdata"], "tokenize": dirs["tokenize"]}
    metrics = finetune.train_worker(FinetuneStepConfig(ft, cfg.task), inputs, out_dir, TaskContext("finetune"))
    return ft, metrics


def test_pretrain_logs_and_exports_a_loadable_model(steps):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, dirs, metrics = steps
    log = [json.loads(l) for l in (dirs["pretrain"] / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8] and all(r["tokens_per_s"] > 0 for r in log)
    assert "val_loss" in log[1] and log[-1]["loss"] < log[0]["loss"]
    assert metrics["num_parameters"] > 0 and metrics["final_val_ppl"] > 1
    assert 0 < metrics["mfu"] < 1 and metrics["memory_gb"] > 0 and metrics["flops_per_token"] > 0
    model = AutoModelForCausalLM.from_pretrained(dirs["pretrain"] / "model")
    assert AutoTokenizer.from_pretrained(dirs["pretrain"] / "model").eos_token == cfg.tokenizer.eos_token
    assert model.config.num_hidden_layers == cfg.model.num_layers


@pytest.mark.parametrize("method,zero_stage,objective,pooling", [
    ("lora", 2, "classifier", "last"), ("prefix", 3, "classifier", "last"), ("full", 3, "classifier", "last"),
    ("lora", 2, "lm", "last"), ("lora", 2, "classifier", "mean")])
def test_finetune_then_evaluate(steps, tmp_path, method, zero_stage, objective, pooling):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg, dirs, _ = steps
    ft, metrics = run_finetune(cfg, dirs, tmp_path / "finetune", method=method, zero_stage=zero_stage,
                               objective=objective, pooling=pooling)
    base = models.load_base_model(dirs["pretrain"] / "model")
    labels = taskdata.load_labels(dirs["taskdata"])
    total = sum(p.numel() for p in base.parameters())
    log = [json.loads(line) for line in (tmp_path / "finetune" / "train_log.jsonl").read_text().splitlines()]
    # what decides the task is logged at every validation, whatever the objective
    assert all(0 <= r["val_accuracy"] <= 1 for r in log if "val_loss" in r) and "final_val_accuracy" in metrics
    if method == "full":
        assert metrics["trainable_parameters"] >= total
        assert not (tmp_path / "finetune" / "adapter").exists()
        tuned = models.load_saved(tmp_path / "finetune" / "model")
        assert any(not torch.equal(a, b) for a, b in zip(tuned.model.parameters(), base.model.parameters()))
    else:
        assert 0 < metrics["trainable_parameters"] < total
        head_base = models.load_base_model(dirs["pretrain"] / "model", labels if objective == "classifier" else None,
                                             base.config.pad_token_id, pooling=pooling)
        assert isinstance(PeftModel.from_pretrained(head_base, tmp_path / "finetune" / "adapter"), PeftModel)
    if objective == "classifier" and method != "prefix":  # a plain Hugging Face classifier, labels included
        saved = tmp_path / "finetune" / ("model" if method == "full" else "merged")
        # a mean-pooled head ships its class's file: Hugging Face loads it as remote code, the same function
        exported = AutoModelForSequenceClassification.from_pretrained(saved, trust_remote_code=pooling == "mean")
        assert [exported.config.id2label[i] for i in range(len(labels))] == labels
        assert type(exported).__name__ == ("MeanPooledLlamaForSequenceClassification" if pooling == "mean"
                                           else "LlamaForSequenceClassification")
        pad = exported.config.pad_token_id
        probe = torch.tensor([[15, 16, 17, 18], [pad, pad, 19, 20]])  # the second row left-padded
        assert torch.allclose(exported(input_ids=probe).logits, models.load_tuned(tmp_path / "finetune",
                              dirs["pretrain"] / "model").eval()(input_ids=probe).logits, atol=1e-5)

    out = tmp_path / "evaluate"
    out.mkdir()
    inputs = {"tokenize": dirs["tokenize"], "pretrain": dirs["pretrain"], "taskdata": dirs["taskdata"],
              "finetune": tmp_path / "finetune"}
    result = evaluate.run(EvaluateStepConfig(cfg.eval, cfg.task, ft.max_length), inputs, out, TaskContext("evaluate"))
    report = json.loads((out / "report.json").read_text())
    variants = {"lengthnorm", "calibrated"} if objective == "lm" else set()  # readings of label likelihood
    assert set(report["task"]["scores"]) == {"majority", "tfidf_logreg", "zero_shot", "untuned", "finetuned", *variants}
    for scores in report["task"]["scores"].values():  # every task metric with its bootstrap interval
        assert scores["accuracy_low"] <= scores["accuracy"] <= scores["accuracy_high"]
    comparison = report["task"]["comparisons"]["tfidf_logreg"]
    assert comparison["low"] <= comparison["accuracy_delta"] <= comparison["high"]
    assert result["finetuned_vs_majority_delta"] == pytest.approx(
        result["finetuned_accuracy"] - result["majority_accuracy"])
    assert report["perplexity"]["pretrained"] == pytest.approx(result["ppl_pretrained"])
    assert {"unigram", "ngram3", "finetuned"} <= set(report["perplexity"])
    if method == "prefix":  # prefix tuning leaves the decoder as it was: so is its language model
        assert result["ppl_finetuned"] == pytest.approx(result["ppl_pretrained"], rel=1e-6)
    assert len(report["samples"]) == cfg.eval.num_samples
    scores = json.loads((out / "label_scores.json").read_text())["scores"]
    if objective == "classifier":  # the head's label log-probabilities: each row normalises to 1
        assert all(abs(sum(math.exp(v) for v in row) - 1) < 1e-4 for row in scores)


def test_classifier_learns_a_separable_task(steps, tmp_path):
    """The classification head on a task a few steps can learn (the label is the first word): the
    fine-tuned model beats the majority class by far, with the whole pipeline of scoring."""
    cfg, dirs, _ = steps
    data = tmp_path / "task.jsonl"
    rows = [{"text": f"{word} {filler} {i}", "label": label} for i in range(60)
            for word, label, filler in (("good", "pos", "the film was fine"), ("awful", "neg", "the film was fine"))]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    task = dataclasses.replace(cfg.task, builtin=None, train_path=str(data), test_fraction=0.25, val_fraction=0.2)
    (tmp_path / "taskdata").mkdir()
    taskdata.run(task, {}, tmp_path / "taskdata", TaskContext("taskdata"))
    task_dirs = {**dirs, "taskdata": tmp_path / "taskdata"}
    ft, metrics = run_finetune(dataclasses.replace(cfg, task=task), task_dirs, tmp_path / "finetune", method="full",
                               zero_stage=0, precision="fp32", lr=1e-3, max_epochs=3.0, eval_every=10)
    assert metrics["max_steps"] == math.ceil(3.0 * len(taskdata.load_split(tmp_path / "taskdata", "train")) / 4)
    (tmp_path / "evaluate").mkdir()
    inputs = {"tokenize": dirs["tokenize"], "pretrain": dirs["pretrain"], "taskdata": tmp_path / "taskdata",
              "finetune": tmp_path / "finetune"}
    result = evaluate.run(EvaluateStepConfig(cfg.eval, task, ft.max_length), inputs, tmp_path / "evaluate",
                          TaskContext("evaluate"))
    assert result["finetuned_accuracy"] >= 0.9 > result["majority_accuracy"]


def test_random_init_is_the_no_pretraining_control(steps, tmp_path):
    cfg, dirs, _ = steps
    run_finetune(cfg, dirs, tmp_path / "finetune", method="full", zero_stage=0, init="random", max_steps=1)
    tuned = models.load_saved(tmp_path / "finetune" / "model").model.embed_tokens.weight
    pretrained = models.load_base_model(dirs["pretrain"] / "model").model.embed_tokens.weight
    torch.manual_seed(cfg.finetune.seed)
    fresh = models.load_base_model(dirs["pretrain"] / "model", init="random").model.embed_tokens.weight
    # one small step from the seeded random weights: near them, not near the pretrained ones
    assert (tuned - fresh).norm() < 0.5 * (tuned - pretrained).norm()
    # scored as the no_pretraining row; here it is also the fine-tuned model: a tie with itself
    (tmp_path / "evaluate").mkdir()
    inputs = {"tokenize": dirs["tokenize"], "pretrain": dirs["pretrain"], "taskdata": dirs["taskdata"],
              "finetune": tmp_path / "finetune", "control": tmp_path / "finetune"}
    result = evaluate.run(EvaluateStepConfig(cfg.eval, cfg.task, cfg.finetune.max_length), inputs,
                          tmp_path / "evaluate", TaskContext("evaluate"))
    assert result["no_pretraining_accuracy"] == result["finetuned_accuracy"]
    assert result["finetuned_vs_no_pretraining_delta"] == 0 == result["finetuned_vs_no_pretraining_low"]


def test_replay_trains_the_language_model_through_the_tied_head(steps, tmp_path):
    """The replay loss of a classifier (decoder + tied embeddings) is the causal LM's own loss on the
    same weights; fine-tuning with replay mixes it in, and validation keeps the task loss alone."""
    from peft import get_peft_model

    cfg, dirs, _ = steps
    labels = taskdata.load_labels(dirs["taskdata"])
    rows = torch.from_numpy(tokenize.load_split(dirs["tokenize"], "train")[:2].astype("int64"))
    lm = models.load_base_model(dirs["pretrain"] / "model").eval()
    head = models.load_base_model(dirs["pretrain"] / "model", labels, lm.config.pad_token_id).eval()
    wrapped = get_peft_model(head, finetune.lora_config(cfg.finetune, "classifier")).eval()
    with torch.no_grad():
        expected = lm(input_ids=rows, labels=rows).loss
        assert finetune.language_model_loss(head, rows) == pytest.approx(expected.item(), rel=1e-5)
        assert finetune.language_model_loss(wrapped, rows) == pytest.approx(expected.item(), rel=1e-5)

    logs = {}
    for name, fraction in (("plain", 0.0), ("replay", 0.5)):
        run_finetune(cfg, dirs, tmp_path / name, method="lora", precision="fp32", replay_fraction=fraction)
        logs[name] = [json.loads(l) for l in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert logs["plain"][0]["loss"] != logs["replay"][0]["loss"]  # the mixed loss trains
    assert all(math.isfinite(r["loss"]) for r in logs["replay"])


def test_label_scores_do_not_depend_on_what_else_is_scored(steps):
    """Each example is scored on its own batch of candidates: the same scores alone or in a run; packed
    (the prompt once, every candidate after it under one mask, examples batched) the same scores again."""
    from transformers import AutoTokenizer

    cfg, dirs, _ = steps
    model = models.load_base_model(dirs["pretrain"] / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(dirs["pretrain"] / "model")
    labels = taskdata.load_labels(dirs["taskdata"])
    fits = lambda r: all(len(taskdata.encode_example(tokenizer, {**r, "label": label}, cfg.task, 10**4)[0]) <= 256
                         for label in labels)  # no input cut: both ways see the same prompts
    records = [r for r in taskdata.load_split(dirs["taskdata"], "test") + taskdata.load_split(dirs["taskdata"], "val")
               if fits(r)][:6]
    assert len(records) >= 3
    alone = [labelscore.label_log_likelihoods(model, tokenizer, r, labels, cfg.task, 256) for r in records]
    again = [labelscore.label_log_likelihoods(model, tokenizer, r, labels, cfg.task, 256) for r in reversed(records)]
    assert alone == again[::-1]
    for batch_size in (1, 4):
        packed = labelscore.packed_label_log_likelihoods(model, tokenizer, records, labels, cfg.task, 256,
                                                         batch_size=batch_size)
        assert np.allclose(packed, alone, atol=1e-4), (packed, alone)
    # right padding: a shorter candidate's score equals its score computed without any padding
    ids, start = taskdata.encode_example(tokenizer, {**records[0], "label": labels[0]}, cfg.task, 256)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    unpadded = sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids)))
    assert alone[0][0] == pytest.approx(unpadded, abs=1e-4)


def test_generation_task_end_to_end(steps, tmp_path):
    """prompt/completion records: loss on the completion, exact match and chrF in the report."""
    cfg, dirs, _ = steps
    data = tmp_path / "gen.jsonl"
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"] * 3
    data.write_text("\n".join(json.dumps({"prompt": f"def get_{n}{i}(self):", "completion": f"return self.{n}{i}"})
                              for i, n in enumerate(names)))
    task = dataclasses.replace(cfg.task, kind="generation", builtin=None, train_path=str(data),
                               prompt_template="{prompt}\n    ", test_fraction=0.3, val_fraction=0.2)
    (tmp_path / "taskdata").mkdir()
    taskdata.run(task, {}, tmp_path / "taskdata", TaskContext("taskdata"))
    gen_dirs = {**dirs, "taskdata": tmp_path / "taskdata"}
    ft, _ = run_finetune(dataclasses.replace(cfg, task=task), gen_dirs, tmp_path / "finetune")
    (tmp_path / "evaluate").mkdir()
    inputs = {"tokenize": dirs["tokenize"], "pretrain": dirs["pretrain"], "taskdata": tmp_path / "taskdata",
              "finetune": tmp_path / "finetune"}
    metrics = evaluate.run(EvaluateStepConfig(cfg.eval, task, ft.max_length), inputs, tmp_path / "evaluate",
                           TaskContext("evaluate"))
    for model in ("untuned", "finetuned"):
        assert 0 <= metrics[f"{model}_exact_match"] <= 1 and 0 <= metrics[f"{model}_chrf"] <= 100
    examples = json.loads((tmp_path / "evaluate" / "report.json").read_text())["task_examples"]
    assert examples[0]["gold"].startswith("return self.")


def run_pretrain(cfg, dirs, out_dir, **changes):
    out_dir.mkdir()
    train_cfg = dataclasses.replace(cfg.pretrain, **changes)
    return pretrain.train_worker(PretrainStepConfig(cfg.model, train_cfg), {"tokenize": dirs["tokenize"]}, out_dir,
                                 TaskContext("pretrain"))


def test_activation_checkpointing_gives_the_same_losses(steps, tmp_path):
    cfg, dirs, _ = steps
    losses = []
    for name, recompute in (("plain", False), ("recompute", True)):
        run_pretrain(cfg, dirs, tmp_path / name, precision="fp32", max_steps=4, activation_checkpointing=recompute)
        losses.append([json.loads(l)["loss"] for l in (tmp_path / name / "train_log.jsonl").read_text().splitlines()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_non_finite_loss_stops_training_without_a_checkpoint(steps, tmp_path):
    from tasks.training import NonFiniteError

    cfg, dirs, _ = steps
    with pytest.raises(NonFiniteError, match="non-finite"):
        run_pretrain(cfg, dirs, tmp_path / "diverged", precision="fp32", lr=1e12, grad_clip=0.0, warmup_steps=0,
                     max_steps=8, checkpoint_every=2, log_every=1)
    checkpoints = tmp_path / "diverged" / "checkpoints"
    for tag in sorted(checkpoints.glob("step*")) if checkpoints.exists() else []:
        state = torch.load(next(tag.glob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
        assert all(torch.isfinite(v).all() for v in state.values()), f"{tag.name} holds non-finite weights"


def test_zero3_pretraining_exports_consolidated_weights(steps, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg, dirs, _ = steps
    out_dir = tmp_path / "zero3"
    run_pretrain(cfg, dirs, out_dir, zero_stage=3, precision="fp32", max_steps=2)
    probe = load_file(str(out_dir / "export_check.safetensors"))  # logits of the training weights
    model = AutoModelForCausalLM.from_pretrained(str(out_dir / "model"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) > 0 and model.model.embed_tokens.weight.shape[0] == 512


def test_lora_merged_model_matches_base_plus_adapter(steps, tmp_path):
    from peft import PeftModel

    cfg, dirs, _ = steps
    _, metrics = run_finetune(cfg, dirs, tmp_path / "finetune", method="lora")
    assert metrics["merge_max_logit_error"] <= 1e-4
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])
    adapter = models.load_tuned(tmp_path / "finetune", dirs["pretrain"] / "model").eval()
    assert isinstance(adapter, PeftModel)
    merged = models.load_saved(tmp_path / "finetune" / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-4)


def test_prefix_tuning_with_activation_checkpointing_under_zero3(steps, tmp_path):
    """PEFT refuses whole-layer checkpointing for prefix tuning; MLP recomputation keeps the losses."""
    cfg, dirs, _ = steps
    losses = []
    for name, recompute in (("plain", False), ("recompute", True)):
        run_finetune(cfg, dirs, tmp_path / name, method="prefix", zero_stage=3, precision="fp32",
                     activation_checkpointing=recompute)
        losses.append([json.loads(l)["loss"] for l in (tmp_path / name / "train_log.jsonl").read_text().splitlines()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_chat_task_from_csv_end_to_end(steps, tmp_path):
    """messages with roles, read from CSV through a field mapping: loss on the last answer only,
    exact match and chrF of generated answers."""
    import csv

    cfg, dirs, _ = steps
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"] * 3
    with open(tmp_path / "chat.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "conversation"])
        for i, n in enumerate(names):
            writer.writerow([i, json.dumps([{"role": "user", "content": f"Return of get_{n}{i}?"},
                                            {"role": "assistant", "content": f"self.{n}{i}"}])])
    task = dataclasses.replace(cfg.task, kind="chat", builtin=None, train_path=str(tmp_path / "chat.csv"),
                               fields={"messages": "conversation"}, test_fraction=0.3, val_fraction=0.2)
    (tmp_path / "taskdata").mkdir()
    taskdata.run(task, {}, tmp_path / "taskdata", TaskContext("taskdata"))
    records = taskdata.load_split(tmp_path / "taskdata", "train")
    assert records[0]["messages"][-1]["role"] == "assistant"

    chat_dirs = {**dirs, "taskdata": tmp_path / "taskdata"}
    ft, metrics = run_finetune(dataclasses.replace(cfg, task=task), chat_dirs, tmp_path / "finetune")
    assert metrics["final_val_loss"] > 0
    (tmp_path / "evaluate").mkdir()
    inputs = {"tokenize": dirs["tokenize"], "pretrain": dirs["pretrain"], "taskdata": tmp_path / "taskdata",
              "finetune": tmp_path / "finetune"}
    result = evaluate.run(EvaluateStepConfig(cfg.eval, task, ft.max_length), inputs, tmp_path / "evaluate",
                          TaskContext("evaluate"))
    assert 0 <= result["finetuned_chrf"] <= 100 and "finetuned_exact_match" in result
    examples = json.loads((tmp_path / "evaluate" / "report.json").read_text())["task_examples"]
    assert examples[0]["gold"].startswith("self.") and "<|user|>" in examples[0]["input"]


ENGINE_START = """
import os, sys, torch, torch.distributed as dist
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533",
                  DS_ACCELERATOR="cpu")
dist.init_process_group("gloo", rank=0, world_size=1)
from conf.schema import ModelConfig, TrainConfig
from tasks import pretrain, training
for stage in (2, 3):
    engine = training.init_engine(pretrain.build_model(ModelConfig(name="t", hidden_size=32, num_layers=1, num_heads=2,
        num_kv_heads=2, intermediate_size=64, max_position_embeddings=32), 64, 0, 2),
        TrainConfig(zero_stage=stage, micro_batch_size=2, global_batch_size=2, max_steps=2), 1)
    ids = torch.randint(3, 64, (2, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
print(sorted(m for m in ("mlflow", "torch._inductor.compile_fx") if m in sys.modules))
"""


def test_a_training_worker_does_not_load_what_deepspeed_never_uses_here():
    """DeepSpeed's ZeRO imports its Muon optimizer (whose torch.compile decorators load torch's
    compiler stack) and its autotuner imports MLflow: seconds of CPU per worker start that
    training.import_deepspeed avoids. A DeepSpeed upgrade that imports them elsewhere fails here."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", ENGINE_START], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
