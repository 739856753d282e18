"""Serving cost of a fine-tuned model: the float model as it would be served (LoRA merged), an
optionally magnitude-pruned, post-training int8 copy (PyTorch dynamic quantisation of the linear
layers, CPU), their size on disk and inference tokens/s. Used by the evaluate step.

The int8 model is saved as a state dict (`torch.save`) and loaded back with
`torch.load(weights_only=True)` into a freshly quantised skeleton, so loading it runs no pickled
code; safetensors cannot hold quantised tensors.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

INT8_FILE = "model_int8.pt"


def served_model(finetune_dir: Path, model_dir: Path) -> torch.nn.Module:
    """The float model a server would load: LoRA merged, the full model, or base + prefix adapter."""
    from tasks.models import load_saved, load_tuned

    for name in ("merged", "model"):
        if (finetune_dir / name).is_dir():
            return load_saved(finetune_dir / name).eval()
    return load_tuned(finetune_dir, model_dir).eval()


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Linear layers but the output head, which stays float like the input embedding (when the two are
    tied, an int8 copy of the head would add bytes; untied, quantising it too would save about a
    quarter of the quickstart model: not done, so tied and untied models compare)."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def prune_magnitude(model: torch.nn.Module, sparsity: float) -> None:
    """The smallest `sparsity` share of each linear layer's weights set to zero (in place)."""
    from torch.nn.utils import prune

    for layer in linear_layers(model).values():
        prune.l1_unstructured(layer, "weight", amount=sparsity)
        prune.remove(layer, "weight")


def quantize(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation (weights int8, activations quantised per batch) of the linear layers."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {name: default_dynamic_qconfig for name in linear_layers(model)}
    return quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8).eval()


def save_and_reload(quantized: torch.nn.Module, skeleton: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
    """Save the int8 state dict, then load it weights-only into `skeleton` (a float model of the same
    architecture, quantised here): the model that is scored is the one on disk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(quantized.state_dict(), out_dir / INT8_FILE)
    reloaded = quantize(skeleton)
    reloaded.load_state_dict(torch.load(out_dir / INT8_FILE, weights_only=True))
    return reloaded


def state_dict_bytes(model: torch.nn.Module, scratch: Path) -> int:
    """Bytes of `torch.save(state_dict)` (shared tensors stored once): float and int8 sized alike."""
    torch.save(model.state_dict(), scratch)
    size = scratch.stat().st_size
    scratch.unlink()
    return size


@torch.no_grad()
def tokens_per_second(models: dict[str, torch.nn.Module], rows: np.ndarray, rounds: int = 3,
                      batch_size: int = 8) -> dict[str, float]:
    """Forward-pass throughput of each model over `rows`, the best of `rounds` in which the models take
    turns: on a shared machine a burst of load then slows them alike."""
    ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    best = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for name, model in models.items():
            started = time.perf_counter()
            for start in range(0, len(ids), batch_size):
                model(input_ids=ids[start : start + batch_size])
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: ids.numel() / seconds for name, seconds in best.items()}
