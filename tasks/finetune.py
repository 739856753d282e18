"""finetune: parameter-efficient tuning (PEFT LoRA or prefix tuning) of the pretrained model
on the task data, under DeepSpeed ZeRO, with the loss on the target tokens only.

Runs in every data-parallel worker (launched by the executor through Ray Train); rank 0
saves the PEFT adapter directory, which loads with `PeftModel.from_pretrained`.

    train_worker(cfg: FinetuneStepConfig, inputs={"pretrain", "taskdata"}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

from pathlib import Path

import torch

from conf.schema import FinetuneConfig, FinetuneStepConfig
from tasks import training
from tasks.common import TaskContext
from tasks.taskdata import encode_example, load_split

IGNORE_INDEX = -100


def lora_config(cfg: FinetuneConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
                      modules_to_save=list(cfg.lora.modules_to_save) or None)


def prefix_config(cfg: FinetuneConfig):
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.prefix.num_virtual_tokens,
                              prefix_projection=cfg.prefix.prefix_projection)


FINETUNE_METHODS = {"lora": lora_config, "prefix": prefix_config}


def load_base_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


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


def train_worker(cfg: FinetuneStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    from peft import get_peft_model
    from transformers import AutoTokenizer

    train_cfg = cfg.finetune
    training.setup_worker(train_cfg)
    rank, world = training.rank_and_world()
    model_dir = Path(inputs["pretrain"]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encode = lambda records: [encode_example(tokenizer, r, cfg.task, train_cfg.max_length) for r in records]
    train_examples = encode(load_split(inputs["taskdata"], "train"))
    val_examples = encode(load_split(inputs["taskdata"], "val"))

    model = get_peft_model(load_base_model(model_dir), FINETUNE_METHODS[train_cfg.method](train_cfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = training.init_engine(model, train_cfg, world)
    if rank == 0:
        ctx.say(f"{train_cfg.method}: {trainable:,} trainable parameters, {len(train_examples)} train examples, "
                f"ZeRO-{train_cfg.zero_stage}, {world} worker(s)")

    def forward(batch: dict) -> torch.Tensor:
        return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss

    def train_batch(step: int, micro: int) -> dict:
        rows = training.sample_rows(step, micro, rank, world, train_cfg, len(train_examples))
        return collate([train_examples[i] for i in rows], tokenizer.pad_token_id)

    eval_batches = [collate([val_examples[i] for i in rows], tokenizer.pad_token_id)
                    for rows in training.eval_row_slices(len(val_examples), train_cfg, rank, world)]
    mean_tokens = sum(len(ids) for ids, _ in train_examples) / len(train_examples)
    log = training.TrainLog(ctx, rank, train_cfg.max_steps, int(train_cfg.global_batch_size * mean_tokens),
                            out_dir / "train_log.jsonl")
    metrics = training.train(engine, train_cfg, forward, train_batch, eval_batches, log, out_dir / "checkpoints")
    if "stopped_at_step" in metrics:  # preempted: the checkpoint stays for the next run
        return metrics

    with training.full_parameters(engine) as module:
        if rank == 0:
            module.save_pretrained(str(out_dir / "adapter"), safe_serialization=True)
            tokenizer.save_pretrained(str(out_dir / "adapter"))
    training.remove_checkpoints(out_dir / "checkpoints", rank)
    return {**metrics, "trainable_parameters": trainable}
