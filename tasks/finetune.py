"""finetune: tuning of the pretrained model on the task data (PEFT LoRA, PEFT prefix tuning,
or full fine-tuning for comparison), under DeepSpeed ZeRO, with the loss on the target tokens only.

Optional techniques from the config: attention / hidden / LoRA dropout, label smoothing and FGM
adversarial training (tasks/regularize.py), augmented training records (tasks/augment.py), and
early stopping that exports the best validation's weights (tasks/earlystop.py).

Runs in every data-parallel worker (launched by the executor through Ray Train). Rank 0 saves
`adapter/` (PEFT methods; loads with `PeftModel.from_pretrained`), for LoRA also `merged/`
(the adapter merged into the base weights, a plain Hugging Face model, checked against base +
adapter on a probe batch), and for full fine-tuning `model/`.

    train_worker(cfg: FinetuneStepConfig, inputs={"pretrain", "taskdata"}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

from pathlib import Path

import torch

from conf.schema import FinetuneConfig, FinetuneStepConfig
from tasks import regularize, training
from tasks.augment import augment_records
from tasks.common import TaskContext
from tasks.earlystop import BestKeeper
from tasks.regularize import IGNORE_INDEX
from tasks.taskdata import encode_example, load_labels, load_split


def lora_config(cfg: FinetuneConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
                      modules_to_save=list(cfg.lora.modules_to_save) or None)


def prefix_config(cfg: FinetuneConfig):
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.prefix.num_virtual_tokens,
                              prefix_projection=cfg.prefix.prefix_projection)


def full_config(cfg: FinetuneConfig) -> None:
    """Every weight trains; there is no adapter."""
    return None


FINETUNE_METHODS = {"lora": lora_config, "prefix": prefix_config, "full": full_config}


def load_base_model(model_dir: Path, **config_changes):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **config_changes)


def prepare_model(model_dir: Path, cfg: FinetuneConfig):
    from peft import get_peft_model

    peft_config = FINETUNE_METHODS[cfg.method](cfg)
    base = load_base_model(model_dir, attention_dropout=cfg.attention_dropout)
    if cfg.hidden_dropout:
        regularize.add_hidden_dropout(base, cfg.hidden_dropout)
    return base if peft_config is None else get_peft_model(base, peft_config)


def load_tuned(finetune_dir: Path, model_dir: Path):
    """The fine-tuned model of a finetune step's output, whatever the method."""
    from peft import PeftModel

    if (finetune_dir / "model").is_dir():
        return load_base_model(finetune_dir / "model")
    return PeftModel.from_pretrained(load_base_model(model_dir), str(finetune_dir / "adapter"))


@torch.no_grad()
def export_merged(model_dir: Path, out_dir: Path, tokenizer, probe_ids: torch.Tensor) -> float:
    """LoRA merged into the base weights, saved as a plain Hugging Face model and proven equal
    to base + adapter on a probe batch; returns the largest logit difference."""
    from safetensors.torch import save_file

    tuned = load_tuned(out_dir, model_dir).eval()
    expected = tuned(input_ids=probe_ids).logits
    merged = tuned.merge_and_unload()
    if merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight:
        merged.config.tie_word_embeddings = False  # a trained embedding copy no longer ties to the head
    merged.save_pretrained(str(out_dir / "merged"), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir / "merged"))
    reloaded = load_base_model(out_dir / "merged").eval()
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


def best_keeper(cfg: FinetuneStepConfig, engine, tokenizer, val_records: list[dict], taskdata_dir: Path,
                out_dir: Path, rank: int) -> BestKeeper | None:
    """Early stopping's keeper of the best weights (None when it is off); `val_records`: this rank's share."""
    stopping = cfg.finetune.early_stopping
    if not stopping.patience:
        return None
    measure = None
    if stopping.metric == "val_accuracy":
        measure = regularize.accuracy_measure(engine, tokenizer, val_records, load_labels(taskdata_dir), cfg.task,
                                              cfg.finetune.max_length)
    return BestKeeper(stopping, out_dir / "checkpoints", rank, measure)


def train_worker(cfg: FinetuneStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    from transformers import AutoTokenizer

    train_cfg = cfg.finetune
    training.setup_worker(train_cfg)
    rank, world = training.rank_and_world()
    model_dir = Path(inputs["pretrain"]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encode = lambda records: [encode_example(tokenizer, r, cfg.task, train_cfg.max_length) for r in records]
    train_records, val_records = load_split(inputs["taskdata"], "train"), load_split(inputs["taskdata"], "val")
    augmented = augment_records(train_records, train_cfg.augment, cfg.task.kind)
    train_examples, val_examples = encode(augmented), encode(val_records)

    model = prepare_model(model_dir, train_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Whole-layer recomputation would drop prefix tuning's trained KV cache: recompute MLPs only.
    engine = training.init_engine(model, train_cfg, world, recompute="mlp" if train_cfg.method == "prefix" else "layers")
    if rank == 0:
        ctx.say(f"{train_cfg.method}: {trainable:,} trainable parameters, {len(train_examples)} train examples, "
                f"ZeRO-{train_cfg.zero_stage}, {world} worker(s)")

    forward = regularize.make_forward(engine, train_cfg, engine.module)

    def train_batch(step: int, micro: int) -> dict:
        rows = training.sample_rows(step, micro, rank, world, train_cfg, len(train_examples))
        return collate([train_examples[i] for i in rows], tokenizer.pad_token_id)

    eval_rows = training.eval_row_slices(len(val_examples), train_cfg, rank, world)
    eval_batches = [collate([val_examples[i] for i in rows], tokenizer.pad_token_id) for rows in eval_rows]
    keeper = best_keeper(cfg, engine, tokenizer, [val_records[i] for rows in eval_rows for i in rows],
                         inputs["taskdata"], out_dir, rank)
    mean_tokens = sum(len(ids) for ids, _ in train_examples) / len(train_examples)
    log = training.TrainLog(ctx, rank, train_cfg.max_steps, int(train_cfg.global_batch_size * mean_tokens),
                            out_dir / "train_log.jsonl")
    metrics = training.train(engine, train_cfg, forward, train_batch, eval_batches, log, out_dir / "checkpoints", keeper)
    if "stopped_at_step" in metrics:  # preempted: the checkpoint stays for the next run
        return metrics

    saved_dir = out_dir / ("model" if train_cfg.method == "full" else "adapter")
    with training.full_parameters(engine) as module:
        if rank == 0:
            if keeper is not None:  # export the weights of the best validation, not the last ones
                keeper.load_best(module, metrics["best_step"])
            module.save_pretrained(str(saved_dir), safe_serialization=True)
            tokenizer.save_pretrained(str(saved_dir))
    if rank == 0 and train_cfg.method == "lora":
        probe = torch.tensor([val_examples[0][0]])
        metrics["merge_max_logit_error"] = export_merged(model_dir, out_dir, tokenizer, probe)
    training.remove_checkpoints(out_dir / "checkpoints", rank)
    return {**metrics, "trainable_parameters": trainable, "augmented_examples": len(augmented) - len(train_records)}
