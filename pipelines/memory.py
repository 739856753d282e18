"""What a training step needs in memory per worker, estimated from the config alone (weights,
gradients, optimizer state, activations of one micro-batch), and what a worker has here;
pipelines/validate.py compares the two before any Ray work starts.
"""
from __future__ import annotations

import os

from conf.schema import Config, FinetuneConfig, ModelConfig, TrainConfig
from tasks.pretrain import num_parameters

GiB = 2**30
# fp32 weights and gradients, and AdamW's two fp32 moments: 16 bytes per trained parameter (bf16 mixed
# precision holds the same: 16-bit weights and gradients beside fp32 master weights and moments)
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 4, 4, 8


def training_memory(cfg: TrainConfig, model: ModelConfig, vocab_size: int, seq_len: int,
                    num_adapter_params: int = 0) -> dict[str, float]:
    """Bytes one training worker holds, estimated from the config alone: 'params' (weights and gradients),
    'optimizer' (AdamW's moments) and 'activations' (of one micro-batch). `num_adapter_params`: the parameters a
    PEFT method adds, the only ones trained; 0: every weight trains. ZeRO divides among the workers the
    optimizer state from stage 1, the gradients from stage 2 and the weights at stage 3; an optimizer
    offloaded from a GPU (offload_optimizer) takes none of its memory."""
    num_weights = num_parameters(model, vocab_size) + num_adapter_params
    num_trained = num_adapter_params or num_weights
    shards = lambda stage: cfg.num_workers if cfg.zero_stage >= stage else 1
    optimizer = 0 if cfg.use_gpu and cfg.offload_optimizer else num_trained * OPTIMIZER_BYTES / shards(1)
    return {"params": num_weights * WEIGHT_BYTES / shards(3) + num_trained * GRAD_BYTES / shards(2),
            "optimizer": optimizer, "activations": activation_bytes(cfg, model, vocab_size, seq_len)}


def activation_bytes(cfg: TrainConfig, model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Activations kept for the backward pass of one micro-batch of b sequences of s tokens: per decoder
    layer (34 h + 5 heads s) s b bytes in 16-bit (Korthikanti et al. 2022, attention scores included),
    twice that in fp32; with activation checkpointing each layer keeps only its input (2 s b h) and one
    layer is recomputed at a time. Plus the logits and their log-softmax in fp32, 8 s b vocab."""
    s, b, h = seq_len, cfg.micro_batch_size, model.hidden_size
    layer = (34 * h + 5 * model.num_heads * s) * s * b
    layers = model.num_layers * 2 * s * b * h + layer if cfg.activation_checkpointing else model.num_layers * layer
    return layers * (2 if cfg.precision == "fp32" else 1) + 8 * s * b * vocab_size


def num_adapter_parameters(cfg: FinetuneConfig, model: ModelConfig, vocab_size: int) -> int:
    """The parameters a PEFT method adds and trains (0 for full fine-tuning), as PEFT counts them: LoRA's
    r x (inputs + outputs) per adapted projection and layer plus a trained copy of each module in
    modules_to_save; prefix tuning's key and value prefixes of width kv_width per layer, or with
    prefix_projection a token embedding and its Linear-Tanh-Linear MLP. A classifier head is left out."""
    h, i, layers = model.hidden_size, model.intermediate_size, model.num_layers
    kv_width = model.num_kv_heads * (h // model.num_heads)
    num_tokens = cfg.prefix.num_virtual_tokens
    if cfg.method == "prefix" and cfg.prefix.prefix_projection:
        return num_tokens * kv_width + (kv_width + 1) * kv_width + (kv_width + 1) * 2 * layers * kv_width
    if cfg.method == "prefix":
        return num_tokens * 2 * layers * kv_width
    if cfg.method != "lora":
        return 0
    shapes = {"q_proj": (h, h), "k_proj": (h, kv_width), "v_proj": (h, kv_width), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    adapters = layers * sum(cfg.lora.r * sum(shapes.get(name, (0, 0))) for name in cfg.lora.target_modules)
    copies = sum(vocab_size * h for name in cfg.lora.modules_to_save if name in ("embed_tokens", "lm_head"))
    return adapters + copies


def worker_memory(cfg: Config, train: TrainConfig) -> float | None:
    """Bytes a training worker can use on this machine: one GPU's memory, or the available memory
    shared by the step's workers. None (not checked) when the run joins a cluster (ray.address or
    $RAY_ADDRESS), whose nodes are not visible from here, or asks for GPUs this machine lacks."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    if train.use_gpu:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    import psutil

    return psutil.virtual_memory().available / train.num_workers
