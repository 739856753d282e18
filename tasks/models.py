"""Loading the models that the stages hand to each other: the pretrained causal LM, the same decoder
under a sequence-classification head, a finetune step's output whatever its method and objective,
and a fine-tuned classifier read back as a language model (for held-out perplexity).

    load_base_model(model_dir[, labels, pad_token_id, init, pooling]) -> causal LM or classifier
    load_tuned(finetune_dir, model_dir) -> the fine-tuned model (plain or PEFT-wrapped)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tasks.prefix_cache import accept_prefix_cache

OBJECTIVE_FILE = "objective.json"
"""In a finetune step's output: {"objective", "labels", "pad_token_id", "pooling"}; how load_tuned rebuilds the model."""


MEAN_POOLED = "MeanPooledLlamaForSequenceClassification"
"""The class of tasks/pooled_classifier.py, by name (that module imports transformers; this one does not at import)."""


def saved_config(saved_dir: Path) -> dict:
    """config.json of a saved model directory ({} for an adapter directory, which has none)."""
    config_file = Path(saved_dir) / "config.json"
    return json.loads(config_file.read_text()) if config_file.exists() else {}


def is_mean_pooled(saved_dir: Path) -> bool:
    return MEAN_POOLED in (saved_config(saved_dir).get("architectures") or [])


def mark_if_pooled(saved_dir: Path) -> None:
    """A saved mean-pooled classifier loads with AutoModelForSequenceClassification (trust_remote_code):
    its class's file beside config.json, and config.json's auto_map naming it. Other models and
    adapters: nothing."""
    import shutil

    if not is_mean_pooled(saved_dir):
        return
    from tasks import pooled_classifier

    shutil.copy(pooled_classifier.__file__, saved_dir / Path(pooled_classifier.__file__).name)
    config = {**saved_config(saved_dir), "auto_map": pooled_classifier.AUTO_MAP}
    (saved_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def head_settings(labels: list[str], pad_token_id: int) -> dict:
    """Config changes that turn the decoder into a sequence classifier over `labels`."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}, "pad_token_id": pad_token_id}


TIED_IN_TRAINING = "lmforge_tied_embeddings"
"""config.json key of a model trained with its output head tied to the input embeddings and saved untied."""


def untie_saved_head(model_dir: Path) -> None:
    """A saved model whose head is tied to the input embeddings rewritten with the head as its own copy
    (`lm_head.weight`, equal values) and `tie_word_embeddings: false`: the same function, but one that
    `tie_weights()` leaves alone. An adapter that trains `embed_tokens` (modules_to_save) keeps the
    frozen head it trained against in every loading path: PeftModel, AutoPeftModel, and PeftModel +
    tie_weights() as lm-evaluation-harness calls it (tied, that call would move the head onto the
    trained embedding copy). lmforge's own loader ties them again (load_base_model), so fine-tuning
    trains what pretraining trained."""
    from safetensors.torch import load_file, save_file

    config = saved_config(model_dir)
    if not config.get("tie_word_embeddings"):
        return
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shard = index["weight_map"]["model.embed_tokens.weight"] if index else "model.safetensors"
    weights = load_file(str(model_dir / shard))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(model_dir / shard), metadata={"format": "pt"})
    if index:
        index["weight_map"]["lm_head.weight"] = shard
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False,
                                                       TIED_IN_TRAINING: True}, indent=2, sort_keys=True) + "\n")


def retie(model):
    """The head tied to the input embeddings again, for a model saved by untie_saved_head."""
    head = model.get_output_embeddings()
    if getattr(model.config, TIED_IN_TRAINING, False) and head is not None:
        head.weight = model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
    return model


def load_base_model(model_dir: Path, labels: list[str] | None = None, pad_token_id: int | None = None,
                    init: str = "pretrained", pooling: str = "last", **config_changes):
    """The pretrained causal LM, or with `labels` the same decoder under a new classification head
    (LlamaForSequenceClassification: the last non-pad position's hidden state, one logit per label;
    pooling='mean': the mean over the non-pad positions, tasks/pooled_classifier.py).
    init='random': the same architecture from random initialisation (seeded by torch's generator)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tasks.pooled_classifier import MeanPooledLlamaForSequenceClassification

    model_class = (AutoModelForCausalLM if labels is None else
                   MeanPooledLlamaForSequenceClassification if pooling == "mean" else AutoModelForSequenceClassification)
    changes = {**config_changes, **({} if labels is None else head_settings(labels, pad_token_id))}
    if init == "random" and model_class is MeanPooledLlamaForSequenceClassification:
        model = model_class(AutoConfig.from_pretrained(str(model_dir), **changes)).float()
    elif init == "random":
        model = model_class.from_config(AutoConfig.from_pretrained(str(model_dir), **changes)).float()
    else:
        model = model_class.from_pretrained(str(model_dir), dtype=torch.float32, **changes)
    return retie(model) if labels is None else accept_prefix_cache(model)


def load_saved(model_dir: Path):
    """A full model saved by a finetune step (model/ or merged/): causal LM or sequence classifier
    (mean-pooled through lmforge's own class, no remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tasks.pooled_classifier import MeanPooledLlamaForSequenceClassification

    architectures = AutoConfig.from_pretrained(str(model_dir)).architectures or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    model_class = (MeanPooledLlamaForSequenceClassification if MEAN_POOLED in architectures
                   else AutoModelForSequenceClassification if classifier else AutoModelForCausalLM)
    return model_class.from_pretrained(str(model_dir), dtype=torch.float32)


def is_classifier(model) -> bool:
    """Whether `model` (plain, PEFT-wrapped or quantised) ends in a sequence-classification head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForSequenceClassification")


def load_tuned(finetune_dir: Path, model_dir: Path):
    """The fine-tuned model of a finetune step's output, whatever the method and objective."""
    from peft import PeftModel

    if (finetune_dir / "model").is_dir():
        return load_saved(finetune_dir / "model")
    meta_file = finetune_dir / OBJECTIVE_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"objective": "lm"}
    labels = meta.get("labels") if meta["objective"] == "classifier" else None
    base = load_base_model(model_dir, labels, meta.get("pad_token_id"), pooling=meta.get("pooling", "last"))
    return PeftModel.from_pretrained(base, str(finetune_dir / "adapter"))


def tuned_language_model(finetune_dir: Path, model_dir: Path, tuned):
    """The fine-tuned model as a language model, for held-out perplexity: itself for the lm objective;
    for a classifier, its (merged) decoder under the pretrained output head, which ties to the
    (possibly tuned) input embeddings where the model ties them. Prefix tuning leaves the decoder as it was."""
    if not is_classifier(tuned):
        return tuned
    saved = next((finetune_dir / name for name in ("merged", "model") if (finetune_dir / name).is_dir()), None)
    source = load_saved(saved) if saved is not None else tuned.get_base_model()
    language_model = load_base_model(model_dir)
    language_model.model.load_state_dict(source.model.state_dict())
    return language_model.eval()
