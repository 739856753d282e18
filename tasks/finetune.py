"""finetune: tuning of the pretrained model on the task data (PEFT LoRA, PEFT prefix tuning,
or full fine-tuning), under DeepSpeed ZeRO.

Objectives (finetune.objective): for classification a sequence-classification head on the
decoder's last hidden state ('classifier', LlamaForSequenceClassification: one logit per label,
cross-entropy, prompts left-padded; PEFT's SEQ_CLS task trains and saves the head beside LoRA or
prefix tuning); otherwise, or with 'lm', the target tokens after the prompt (loss on the target
tokens only). Every validation logs val_accuracy for classification, what decides the task.
The budget is max_steps or max_epochs; init='random' is the no-pretraining control.

Optional techniques from the config: attention / hidden / LoRA dropout, label smoothing and FGM
adversarial training (tasks/regularize.py), augmented training records (tasks/augment.py), and
early stopping that exports the best validation's weights (tasks/earlystop.py), and replay of
pretraining rows mixed into the loss (finetune.replay_fraction) to keep the language model.

Runs in every data-parallel worker (launched by the executor through Ray Train). Rank 0 saves
`adapter/` (PEFT methods; loads with `PeftModel.from_pretrained`), for LoRA also `merged/`
(the adapter merged into the base weights, a plain Hugging Face model, checked against base +
adapter on a probe batch), for full fine-tuning `model/`, and `objective.json`; a classifier's
`model/` and `merged/` load with `AutoModelForSequenceClassification`. Each directory has a model
card (README.md), full models generation defaults, and for chat tasks the tokenizer carries
task.chat_template, the format the model learned (tasks/modelcard.py).

    train_worker(cfg: FinetuneStepConfig, inputs={"pretrain", "taskdata"[, "tokenize"]}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch

from conf.schema import FinetuneConfig, FinetuneStepConfig, TaskConfig
from tasks import modelcard, regularize, training
from tasks.augment import augment_records
from tasks.common import TaskContext, write_json
from tasks.distributed import all_reduce_sum, full_parameters
from tasks.models import OBJECTIVE_FILE, is_classifier, load_base_model, load_saved, load_tuned, mark_if_pooled
from tasks.earlystop import BestKeeper
from tasks.regularize import IGNORE_INDEX
from tasks.taskdata import encode_example, load_labels, load_split
from tasks.tokenize import load_split as load_tokens


OBJECTIVES = ("auto", "classifier", "lm")
POOLINGS = ("last", "mean")


def resolve_objective(cfg: FinetuneConfig, kind: str) -> str:
    """finetune.objective with 'auto' decided: a classification head for classification tasks."""
    if cfg.objective == "auto":
        return "classifier" if kind == "classification" else "lm"
    return cfg.objective


def task_type(objective: str):
    from peft import TaskType

    return TaskType.SEQ_CLS if objective == "classifier" else TaskType.CAUSAL_LM


def lora_config(cfg: FinetuneConfig, objective: str = "lm"):
    """LoRA; for the classifier PEFT also trains and saves the new `score` head (SEQ_CLS)."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type(objective), r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
                      modules_to_save=list(cfg.lora.modules_to_save) or None)


def prefix_config(cfg: FinetuneConfig, objective: str = "lm"):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=task_type(objective), num_virtual_tokens=cfg.prefix.num_virtual_tokens,
                              prefix_projection=cfg.prefix.prefix_projection)


def full_config(cfg: FinetuneConfig, objective: str = "lm") -> None:
    """Every weight trains; there is no adapter."""
    return None


FINETUNE_METHODS = {"lora": lora_config, "prefix": prefix_config, "full": full_config}


def prepare_model(model_dir: Path, cfg: FinetuneConfig, objective: str = "lm", labels: list[str] | None = None,
                  pad_token_id: int | None = None):
    from peft import get_peft_model

    peft_config = FINETUNE_METHODS[cfg.method](cfg, objective)
    base = load_base_model(model_dir, labels if objective == "classifier" else None, pad_token_id, cfg.init,
                           cfg.pooling, attention_dropout=cfg.attention_dropout)
    if cfg.hidden_dropout:
        regularize.add_hidden_dropout(base, cfg.hidden_dropout)
    if cfg.freeze_embeddings:
        base.get_input_embeddings().weight.requires_grad_(False)
    return base if peft_config is None else get_peft_model(base, peft_config)


def export_tuned(module, saved_dir: Path, tokenizer, card: modelcard.Card) -> None:
    """The fine-tuned weights (a full model, or a PEFT adapter), the tokenizer and the model card (in place
    of PEFT's empty template) saved in saved_dir; a full model with generation defaults (tasks/modelcard.py)."""
    if not hasattr(module, "peft_config"):
        modelcard.set_generation_defaults(module, tokenizer)
    module.save_pretrained(str(saved_dir), safe_serialization=True)
    mark_if_pooled(saved_dir)
    tokenizer.save_pretrained(str(saved_dir))
    modelcard.write_card(saved_dir, card)


@torch.no_grad()
def export_merged(model_dir: Path, out_dir: Path, tokenizer, probe_ids: torch.Tensor, card: modelcard.Card) -> float:
    """LoRA merged into the base weights, saved as a plain Hugging Face model (generation defaults, model
    card) and proven equal to base + adapter on a probe batch; returns the largest logit difference."""
    from safetensors.torch import save_file

    tuned = load_tuned(out_dir, model_dir).eval()
    expected = tuned(input_ids=probe_ids).logits
    merged = tuned.merge_and_unload()
    head = merged.get_output_embeddings()
    if head is not None and head.weight is not merged.get_input_embeddings().weight:
        merged.config.tie_word_embeddings = False  # a trained embedding copy no longer ties to the head
    export_tuned(merged, out_dir / "merged", tokenizer, card)
    reloaded = load_saved(out_dir / "merged").eval()
    error = (reloaded(input_ids=probe_ids).logits - expected).abs().max().item()
    if error > 1e-4:
        raise RuntimeError(f"merged LoRA model differs from base + adapter (max logit error {error:.2e})")
    save_file({"input_ids": probe_ids, "logits": expected.contiguous()}, str(out_dir / "merge_check.safetensors"))
    return error


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict:
    """Right-pad a batch; labels are IGNORE_INDEX on the prompt and the padding."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, target_start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, target_start : len(ids)] = torch.tensor(ids[target_start:])
        attention[row, : len(ids)] = 1
    # HF shifts labels inside the model: the first target token is predicted from the last prompt token.
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "weight": int((labels[:, 1:] != IGNORE_INDEX).sum())}


def collate_classes(examples: list[tuple[list[int], int]], pad_id: int) -> dict:
    """Left-pad prompts for the classification head (its input is the last position, also when the
    model gets embeddings rather than ids, as under FGM); labels are class indices, one per row."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention,
            "labels": torch.tensor([label for _, label in examples], dtype=torch.long), "weight": len(examples)}


def class_example(tokenizer, record: dict, task: TaskConfig, max_length: int, label_index: dict) -> tuple[list[int], int]:
    """(prompt ids, class index) of a record for the head: the prompt cut as for the lm objective."""
    ids, start = encode_example(tokenizer, record, task, max_length)
    return ids[:start], label_index.get(record["label"], IGNORE_INDEX)  # a label unseen in training never counts as right


def head_accuracy(engine, eval_batches: list) -> Callable[[], dict]:
    """Validation accuracy of the head on this rank's validation batches, summed over ranks."""
    def measure() -> dict:
        engine.eval()
        right = total = 0
        with torch.no_grad():
            for batch in eval_batches:
                logits = engine.module(input_ids=batch["input_ids"].to(engine.device),
                                       attention_mask=batch["attention_mask"].to(engine.device)).logits
                right += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
                total += len(batch["labels"])
        engine.train()
        right, total = all_reduce_sum([float(right), float(total)])
        return {"val_accuracy": right / max(total, 1.0)}

    return measure


def replay_rows(tokens, cfg: FinetuneConfig, step: int, micro: int, rank: int) -> torch.Tensor:
    """This micro-batch's pretraining rows for replay: seeded by (seed, step, micro-batch, rank), so a
    resumed run replays the same rows; cut at max_length tokens."""
    import numpy as np

    count = math.ceil(cfg.replay_fraction * cfg.micro_batch_size)
    rows = np.random.default_rng([cfg.seed, step, micro, rank]).integers(0, len(tokens), count)
    return torch.from_numpy(np.asarray(tokens[np.sort(rows), : cfg.max_length], dtype=np.int64))


def language_model_loss(bare, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss of the model's decoder on pretraining rows (LoRA layers active): through the
    output head, or for a classifier through the tied input embeddings."""
    import torch.nn.functional as F

    inner = bare.get_base_model() if hasattr(bare, "get_base_model") else bare
    if is_classifier(inner):
        hidden = inner.model(input_ids=input_ids).last_hidden_state
        embeddings = inner.get_input_embeddings()
        weight = embeddings.weight if hasattr(embeddings, "weight") else embeddings.modules_to_save["default"].weight
        logits = F.linear(hidden, weight)
    else:
        logits = inner(input_ids=input_ids).logits
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1))


def with_replay(forward: Callable, bare, cfg: FinetuneConfig) -> Callable:
    """The task loss mixed with the language-model loss of the batch's replay rows (while training;
    validation keeps the task loss alone, comparable with runs without replay)."""
    if not cfg.replay_fraction:
        return forward

    def mixed(batch: dict) -> torch.Tensor:
        task = forward(batch)
        if not torch.is_grad_enabled() or "replay_ids" not in batch:
            return task
        return (1 - cfg.replay_fraction) * task + cfg.replay_fraction * language_model_loss(bare, batch["replay_ids"])

    return mixed


def stopping_metric(cfg: FinetuneConfig, kind: str) -> str:
    """early_stopping.metric with 'auto' decided: validation accuracy for classification."""
    metric = cfg.early_stopping.metric
    if metric == "auto":
        return "val_accuracy" if kind == "classification" else "val_loss"
    return metric


def epoch_budget(cfg: FinetuneConfig, num_examples: int) -> FinetuneConfig:
    """finetune.max_epochs, where set, turned into max_steps for this many training records."""
    if cfg.max_epochs <= 0:
        return cfg
    return dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.max_epochs * num_examples / cfg.global_batch_size)))


def train_worker(cfg: FinetuneStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    return training.run_worker(cfg.finetune, out_dir, ctx, lambda rank, world: prepare(cfg, inputs, out_dir, ctx, rank, world))


def prepare(cfg: FinetuneStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext, rank: int, world: int) -> training.Job:
    """The tuned model, its engine, the encoded examples, validation and early stopping; the exports
    once training finished (`export_all`)."""
    from transformers import AutoTokenizer

    model_dir = Path(inputs["pretrain"]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    objective = resolve_objective(cfg.finetune, cfg.task.kind)
    labels = load_labels(inputs["taskdata"]) if cfg.task.kind == "classification" else None
    train_records, val_records = load_split(inputs["taskdata"], "train"), load_split(inputs["taskdata"], "val")
    augmented = augment_records(train_records, cfg.finetune.augment, cfg.task.kind)
    train_cfg = epoch_budget(cfg.finetune, len(augmented))
    if objective == "classifier":
        label_index = {label: i for i, label in enumerate(labels)}
        encode = lambda records: [class_example(tokenizer, r, cfg.task, train_cfg.max_length, label_index) for r in records]
        batch_of = lambda examples: collate_classes(examples, tokenizer.pad_token_id)
    else:
        encode = lambda records: [encode_example(tokenizer, r, cfg.task, train_cfg.max_length) for r in records]
        batch_of = lambda examples: collate(examples, tokenizer.pad_token_id)
    train_examples, val_examples = encode(augmented), encode(val_records)

    model = prepare_model(model_dir, train_cfg, objective, labels, tokenizer.pad_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Whole-layer recomputation would drop prefix tuning's trained KV cache: recompute MLPs only.
    engine = training.init_engine(model, train_cfg, world, recompute="mlp" if train_cfg.method == "prefix" else "layers")
    if rank == 0:
        ctx.say(f"{train_cfg.method} ({objective} objective, {train_cfg.init} init): {trainable:,} trainable "
                f"parameters, {len(train_examples)} train examples, {train_cfg.max_steps} steps "
                f"({train_cfg.max_steps * train_cfg.global_batch_size / len(train_examples):.2f} epochs), "
                f"ZeRO-{train_cfg.zero_stage}, {world} worker(s)")

    forward = with_replay(regularize.make_forward(engine, train_cfg, engine.module), engine.module, train_cfg)
    replay_tokens = load_tokens(Path(inputs["tokenize"]), "train") if train_cfg.replay_fraction else None

    def train_batch(step: int, micro: int) -> dict:
        rows = training.sample_rows(step, micro, rank, world, train_cfg, len(train_examples))
        batch = batch_of([train_examples[i] for i in rows])
        if replay_tokens is not None:
            batch["replay_ids"] = replay_rows(replay_tokens, train_cfg, step, micro, rank)
        return batch

    eval_rows = training.eval_row_slices(len(val_examples), train_cfg, rank, world)
    eval_batches = [batch_of([val_examples[i] for i in rows]) for rows in eval_rows]
    validate = None  # what decides the task, at every validation: accuracy, not only a token-averaged loss
    if objective == "classifier":
        validate = head_accuracy(engine, eval_batches)
    elif labels is not None:
        measure = regularize.accuracy_measure(engine, tokenizer, [val_records[i] for rows in eval_rows for i in rows],
                                              labels, cfg.task, train_cfg.max_length)
        validate = lambda: {"val_accuracy": measure()}
    stopping = dataclasses.replace(train_cfg.early_stopping, metric=stopping_metric(train_cfg, cfg.task.kind))
    keeper = BestKeeper(stopping, out_dir / training.CHECKPOINTS, rank) if stopping.patience else None
    mean_tokens = sum(len(ids) for ids, _ in train_examples) / len(train_examples)
    log = training.TrainLog(ctx, rank, train_cfg.max_steps, int(train_cfg.global_batch_size * mean_tokens),
                            out_dir / "train_log.jsonl")
    tuned = Tuned(engine, train_cfg, cfg.task, objective, labels, tokenizer, model_dir, out_dir, rank, keeper)

    def finish(metrics: dict) -> dict:
        metrics = export_all(tuned, {**metrics, "trainable_parameters": trainable},
                             lambda: torch.tensor([val_examples[0][0]]))
        return {**metrics, "augmented_examples": len(augmented) - len(train_records), "max_steps": train_cfg.max_steps}

    return training.Job(engine, train_cfg, forward, train_batch, eval_batches, log, finish, keeper, validate)


@dataclasses.dataclass
class Tuned:
    """A fine-tuning worker's trained engine and what its exports need."""

    engine: object
    cfg: FinetuneConfig
    task: TaskConfig
    objective: str
    labels: list[str] | None
    tokenizer: object
    model_dir: Path
    out_dir: Path
    rank: int
    keeper: BestKeeper | None


def export_all(tuned: Tuned, metrics: dict, probe: Callable[[], torch.Tensor]) -> dict:
    """Rank 0 saves the tuned weights (those of the best validation with early stopping), objective.json,
    and for LoRA the merged model; every rank takes part in gathering ZeRO-3 weights."""
    cfg, out_dir, rank, tokenizer = tuned.cfg, tuned.out_dir, tuned.rank, tuned.tokenizer
    kind = "model" if cfg.method == "full" else "adapter"

    def card(directory: str) -> modelcard.Card:
        return modelcard.finetune_card(directory, cfg, tuned.task, tuned.objective, tuned.labels, metrics, tokenizer,
                                       out_dir / directory, tuned.model_dir)

    if rank == 0 and tuned.task.kind == "chat":  # users prompt it the way it was trained (modelcard.chat_note)
        tokenizer.chat_template = tuned.task.chat_template
    with full_parameters(tuned.engine) as module:
        if rank == 0:
            if tuned.keeper is not None:  # export the weights of the best validation, not the last ones
                tuned.keeper.load_best(module, metrics["best_step"])
            export_tuned(module, out_dir / kind, tokenizer, card(kind))
            write_json(out_dir / OBJECTIVE_FILE, {"objective": tuned.objective, "labels": tuned.labels,
                                                  "pad_token_id": tokenizer.pad_token_id, "pooling": cfg.pooling})
    if rank == 0 and cfg.method == "lora":
        metrics["merge_max_logit_error"] = export_merged(tuned.model_dir, out_dir, tokenizer, probe(), card("merged"))
    return metrics
