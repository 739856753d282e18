"""pretrain: a Llama-style causal LM from conf/model/*.yaml, trained with DeepSpeed ZeRO on the
packed token arrays, exported as a Hugging Face directory (safetensors, config, generation defaults,
tokenizer, a model card: tasks/modelcard.py).

`train_worker` runs in every data-parallel worker (the executor launches them with Ray
Train); rank 0 writes the export and the training log.

    train_worker(cfg: PretrainStepConfig, inputs={"tokenize": dir}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from conf.schema import ModelConfig, PretrainStepConfig
from tasks import modelcard, models, training
from tasks.common import TaskContext
from tasks.distributed import full_parameters
from tasks.tokenize import load_split, load_tokenizer


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int, bos_id: int | None = None):
    """A fresh model; its config names the tokenizer's special ids (meta.json's), as users of the export expect."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def num_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """What `count_parameters(build_model(cfg, vocab_size, ...))` counts, without building it: the
    embedding (and an untied output head), per layer the attention and MLP projections (no biases) and
    two RMSNorm weights, and the final norm."""
    kv_width = cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads)
    attention = 2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * kv_width
    layer = attention + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size
    embeddings = (1 if cfg.tie_embeddings else 2) * vocab_size * cfg.hidden_size
    return embeddings + cfg.num_layers * layer + cfg.hidden_size


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (weights of every matrix multiply, the output head included)
    plus attention scores and weighted sums, 12 x layers x width x sequence length."""
    head_dim = cfg.hidden_size // cfg.num_heads
    attention = 2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * cfg.num_kv_heads * head_dim
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    matmul_weights = cfg.num_layers * (attention + mlp) + cfg.hidden_size * vocab_size
    return 6.0 * matmul_weights + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def train_worker(cfg: PretrainStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    return training.run_worker(cfg.pretrain, out_dir, ctx, lambda rank, world: prepare(cfg, inputs, out_dir, ctx, rank, world))


def prepare(cfg: PretrainStepConfig, inputs: dict, out_dir: Path, ctx: TaskContext, rank: int, world: int) -> training.Job:
    """The model, its engine, the token rows and the training log; the export once training finished."""
    train_cfg = cfg.pretrain
    tokenize_dir = Path(inputs["tokenize"])
    meta = json.loads((tokenize_dir / "meta.json").read_text())
    train_rows, val_rows = load_split(tokenize_dir, "train"), load_split(tokenize_dir, "val")

    model = build_model(cfg.model, meta["vocab_size"], meta["pad_id"], meta["eos_id"], meta["bos_id"])
    num_params = count_parameters(model)
    engine = training.init_engine(model, train_cfg, world)
    if rank == 0:
        ctx.say(f"{cfg.model.name}: {num_params / 1e6:.2f}M parameters, ZeRO-{train_cfg.zero_stage}, "
                f"{world} worker(s), {len(train_rows):,} train rows of {meta['seq_len']}")

    def to_batch(rows: np.ndarray) -> dict:
        ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return {"input_ids": ids, "weight": len(ids)}

    def forward(batch: dict) -> torch.Tensor:
        return engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def train_batch(step: int, micro: int) -> dict:
        rows = training.sample_rows(step, micro, rank, world, train_cfg, len(train_rows))
        return to_batch(train_rows[np.sort(rows)])

    eval_batches = [to_batch(val_rows[i]) for i in training.eval_row_slices(len(val_rows), train_cfg, rank, world)]
    fpt = flops_per_token(cfg.model, meta["vocab_size"], meta["seq_len"])
    log = training.TrainLog(ctx, rank, train_cfg.max_steps, train_cfg.global_batch_size * meta["seq_len"],
                            out_dir / "train_log.jsonl", flops_per_token=fpt / world,
                            peak_flops=training.measure_peak_flops(train_cfg), use_gpu=train_cfg.use_gpu)

    def finish(metrics: dict) -> dict:
        with full_parameters(engine) as module:
            if rank == 0:
                tokenizer = load_tokenizer(tokenize_dir / "tokenizer")
                card = modelcard.pretrain_card(cfg.model, train_cfg, meta, {**metrics, "num_parameters": num_params},
                                               tokenizer, tokenize_dir.name)
                probe_ids = torch.from_numpy(np.asarray(val_rows[:2, :32], dtype=np.int64))
                export(module, tokenize_dir, out_dir, probe_ids, tokenizer, card)
        return {**metrics, "num_parameters": num_params, "flops_per_token": fpt}

    return training.Job(engine, train_cfg, forward, train_batch, eval_batches, log, finish)


@torch.no_grad()
def export(module: torch.nn.Module, tokenize_dir: Path, out_dir: Path, probe_ids: torch.Tensor, tokenizer,
           card: modelcard.Card) -> None:
    """Save the Hugging Face directory (with generation defaults for `tokenizer`, and the model card), then
    prove it: reload it and compare logits on a probe batch with the training weights. The probe and its
    logits are kept (export_check.safetensors)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    export_dir = out_dir / "model"
    modelcard.set_generation_defaults(module, tokenizer)
    module.save_pretrained(str(export_dir), safe_serialization=True)
    models.untie_saved_head(export_dir)
    for item in (tokenize_dir / "tokenizer").iterdir():
        shutil.copy(item, export_dir / item.name)
    modelcard.write_card(export_dir, card)
    module.eval()
    weight = next(module.parameters())
    probe_ids = probe_ids.to(weight.device)
    expected = module(input_ids=probe_ids).logits.float()
    # Reloaded in the training dtype on the training device: the same arithmetic, so any
    # difference comes from the saved weights.
    reloaded = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=weight.dtype).to(weight.device).eval()
    error = (reloaded(input_ids=probe_ids).logits.float() - expected).abs().max().item()
    if error > 1e-4:
        raise RuntimeError(f"exported model differs from the training weights (max logit error {error:.2e})")
    save_file({"input_ids": probe_ids.cpu(), "logits": expected.cpu().contiguous()},
              str(out_dir / "export_check.safetensors"))
