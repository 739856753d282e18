"""Fine-tuning regularisation and robustness in the training step: dropout on the residual stream,
label-smoothed target loss, FGM adversarial training on the input embeddings, and the
validation accuracy that early stopping can watch.

    make_forward(model, cfg: FinetuneConfig) -> forward(batch) -> loss    (used by tasks/finetune.py)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from conf.schema import FinetuneConfig
from tasks.distributed import all_reduce_sum
from tasks.labelscore import label_log_likelihoods

IGNORE_INDEX = -100


def add_hidden_dropout(model: torch.nn.Module, p: float) -> int:
    """Dropout on the output of every decoder layer (active in training mode only); returns the count."""
    layers = [m for m in model.modules() if hasattr(m, "mlp") and hasattr(m, "self_attn")]

    def hook(module, _args, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    for layer in layers:
        layer.register_forward_hook(hook)
    return len(layers)


def target_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy of the target tokens, shifted as Hugging Face does, with label smoothing;
    for a classification head (one row of logits and one class index per example) of the classes."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def fgm_loss(loss_of: Callable, probe_loss_of: Callable, embed: Callable, batch: dict, epsilon: float) -> torch.Tensor:
    """FGM (Miyato et al.): the mean of the clean loss and the loss with each sequence's input
    embeddings moved by `epsilon` (L2) along the clean loss's gradient. The direction comes from a
    probe pass (`probe_loss_of`, the bare module: DeepSpeed's backward hooks stay out of it); the
    clean and perturbed copies then go through `loss_of` as one doubled batch, so the training
    engine sees one forward and one backward, whatever the method trains."""
    embeds = embed(batch["input_ids"])
    probe = embeds.detach().requires_grad_()
    (grad,) = torch.autograd.grad(probe_loss_of(batch, inputs_embeds=probe), probe)
    norm = grad.float().flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (grad.dim() - 1)))
    perturbed = embeds + (epsilon * grad / norm).to(embeds.dtype)
    doubled = {key: torch.cat([batch[key], batch[key]]) for key in ("attention_mask", "labels")}
    return loss_of(doubled, inputs_embeds=torch.cat([embeds, perturbed]))


def make_forward(model, cfg: FinetuneConfig, bare=None) -> Callable[[dict], torch.Tensor]:
    """forward(batch) -> mean target loss through `model` (the training engine; `bare` is the
    module inside it). Label smoothing and FGM apply while gradients are on; validation
    (no_grad) gets the plain loss, so runs with and without them compare."""
    bare = model if bare is None else bare

    def loss_through(net) -> Callable[..., torch.Tensor]:
        def loss_of(batch: dict, **inputs) -> torch.Tensor:
            smoothing = cfg.label_smoothing if torch.is_grad_enabled() else 0.0
            if smoothing == 0:
                return net(**inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            return target_loss(net(**inputs, attention_mask=batch["attention_mask"]).logits, batch["labels"], smoothing)
        return loss_of

    loss_of = loss_through(model)

    def forward(batch: dict) -> torch.Tensor:
        if cfg.adversarial_epsilon == 0 or not torch.is_grad_enabled():
            return loss_of(batch, input_ids=batch["input_ids"])
        return fgm_loss(loss_of, loss_through(bare), bare.get_input_embeddings(), batch, cfg.adversarial_epsilon)

    return forward


def accuracy_measure(engine, tokenizer, records: list[dict], labels: list[str], cfg, max_length: int) -> Callable[[], float]:
    """Validation accuracy by label likelihood on this rank's share of `records`, summed over ranks."""
    def measure() -> float:
        engine.eval()
        correct = sum(labels[int(np.argmax(label_log_likelihoods(engine.module, tokenizer, r, labels, cfg, max_length)))]
                      == r["label"] for r in records)
        engine.train()
        right, total = all_reduce_sum([float(correct), float(len(records))])
        return right / max(total, 1.0)

    return measure
