"""Exported model directories that MLflow and Hugging Face users load without reading our docs: generation
defaults and special-token ids that agree with the tokenizer, and a model card (README.md with Hugging Face
metadata) that says what the model is, what it learned from, how, how well, and how to load it.

The pretrain and finetune exports call these; cards hold no timestamps or absolute paths, so two runs of a
step write the same bytes.

    set_generation_defaults(model, tokenizer)        before save_pretrained
    write_card(model_dir, Card(...))                 after it (replaces PEFT's empty template)
    pretrain_card(...), finetune_card(...) -> Card
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from conf.schema import FinetuneConfig, ModelConfig, PretrainConfig, TaskConfig, TrainConfig

MAX_NEW_TOKENS = 256
"""Most tokens an untuned `generate` / text-generation pipeline call adds (generation_config.json)."""
CARD_METRICS = ("final_loss", "final_val_loss", "final_val_ppl", "final_val_accuracy", "best_step",
                "num_parameters", "trainable_parameters", "skipped_steps")
"""Metrics a card shows: the model's quality and size, never timings (a rerun writes the same card)."""
METHOD_TAGS = {"lora": "lora", "prefix": "prefix-tuning", "full": "full-fine-tuning"}
URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def special_token_ids(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def generation_budget(max_positions: int, trained_length: int | None) -> int:
    """Default max_new_tokens. The context is max_position_embeddings, or the tokenizer's model_max_length
    (the sequence length the model was trained on) where shorter; half of it is the prompt allowance, so a
    prompt of up to half the context plus the default budget never runs past it. At most MAX_NEW_TOKENS."""
    context = min(max_positions, trained_length or max_positions)
    return max(1, min(MAX_NEW_TOKENS, context // 2))


def set_generation_defaults(model, tokenizer) -> None:
    """config.json's bos/eos/pad ids set to the tokenizer's, and for a generating model a generation config
    (saved as generation_config.json) with those ids and a max_new_tokens that fits the context."""
    from transformers import GenerationConfig

    ids = special_token_ids(tokenizer)
    for name, value in ids.items():
        setattr(model.config, name, value)
    if model.can_generate():
        budget = generation_budget(model.config.max_position_embeddings, tokenizer.model_max_length)
        model.generation_config = GenerationConfig(max_new_tokens=budget, **ids)


@dataclass
class Card:
    """What a model card says; `render` lays it out."""

    title: str
    summary: str
    library: str
    """'transformers' or 'peft' (the library that loads the directory)."""
    pipeline_tag: str
    tags: list[str]
    data: list[str]
    method: dict
    metrics: dict
    chat: str
    usage: str
    base_model: str | None = None
    """The base model directory, relative to this one."""
    provenance: list[str] = field(default_factory=lambda: [
        "Made by an lmforge pipeline run (`python -m pipelines.run`, Hydra overrides on conf/config.yaml). The "
        "step's full configuration, its inputs' fingerprints and the code version are in `../_manifest.json`."])


def front_matter(card: Card) -> dict:
    """Hugging Face model card metadata; no license (the corpus decides it, and the step does not know it)."""
    meta = {"library_name": card.library, "pipeline_tag": card.pipeline_tag, "tags": card.tags}
    return {**meta, "base_model": card.base_model} if card.base_model else meta


def render(card: Card) -> str:
    method = "\n".join(f"- {name}: {value}" for name, value in card.method.items())
    metrics = "\n".join(f"- {name}: {format_value(value)}" for name, value in card.metrics.items()) or "- none recorded"
    sections = [f"# {card.title}", card.summary, "## Training data", "\n".join(f"- {line}" for line in card.data),
                "## Method", method, "## Metrics", metrics, "## Chat model", card.chat,
                "## How to load it", f"```python\n{card.usage.strip()}\n```", "## How it was made",
                "\n".join(card.provenance)]
    return f"---\n{yaml.safe_dump(front_matter(card), sort_keys=False)}---\n\n" + "\n\n".join(sections) + "\n"


def write_card(model_dir: Path, card: Card) -> None:
    (Path(model_dir) / "README.md").write_text(render(card))


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def card_metrics(metrics: dict) -> dict:
    return {name: metrics[name] for name in CARD_METRICS if name in metrics}


def without_credentials(path: str) -> str:
    """A data path as a card may show it: credentials in a URI (`s3://key:secret@bucket`) left out."""
    return URI_CREDENTIALS.sub("", str(path))


def chat_note(tokenizer, trained_on_chat: bool, trained_on: str = "plain text: it continues text") -> str:
    """Whether the model is a chat model, plainly. A model not trained on conversations gets no invented
    template: one would make `apply_chat_template` and chat front-ends succeed silently against a model that
    never saw a conversation, which misleads more than the error transformers raises without a template."""
    if trained_on_chat:
        return ("Yes. It was fine-tuned on conversations rendered by the tokenizer's chat template: "
                "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives the prompt format it "
                "learned, and it ends its answer with the EOS token.")
    template = ("the tokenizer carries a chat template, so `apply_chat_template` works, but its output is not a "
                "format the model knows" if tokenizer.chat_template else
                "the tokenizer has no chat template, so `apply_chat_template` raises")
    return f"No. It was not trained on conversations but on {trained_on}; {template}."


def causal_lm_usage() -> str:
    return ("from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n\n"
            'model_dir = "path/to/this/directory"\n'
            "model = AutoModelForCausalLM.from_pretrained(model_dir)\n"
            "tokenizer = AutoTokenizer.from_pretrained(model_dir)\n"
            "# generation_config.json holds the defaults: greedy, the tokenizer's EOS and pad, a max_new_tokens\n"
            "# that fits the context\n"
            'generate = pipeline("text-generation", model=model_dir)\n'
            'print(generate("Hello")[0]["generated_text"])\n')


def classifier_usage(mean_pooled: bool = False, model_dir: str = "path/to/this/directory") -> str:
    """A mean-pooled head's class is pooled_classifier.py beside the weights: remote code to transformers."""
    remote = (", trust_remote_code=True)  # the mean-pooled head's class: pooled_classifier.py, beside the weights\n"
              if mean_pooled else ")  # labels in config.id2label\n")
    return ("from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f'model_dir = "{model_dir}"\n'
            f"model = AutoModelForSequenceClassification.from_pretrained(model_dir{remote}"
            "tokenizer = AutoTokenizer.from_pretrained(model_dir)\n")


def adapter_usage(base_model: str, classifier: bool, labels: list[str] | None, pad_token_id: int | None) -> str:
    """PeftModel over the base model found relative to the adapter directory (works wherever the run's root
    directory is moved), and AutoPeftModel through adapter_config.json's path (where the run wrote it)."""
    model_class = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    head = (f", num_labels={len(labels)}, id2label={dict(enumerate(labels))!r}, pad_token_id={pad_token_id}"
            if classifier else "")
    auto_class = f"AutoPeftModelFor{'SequenceClassification' if classifier else 'CausalLM'}"
    return (f"import os\n\nfrom peft import {auto_class}, PeftModel\nfrom transformers import {model_class}\n\n"
            'adapter_dir = "path/to/this/directory"\n'
            f"base_dir = os.path.join(adapter_dir, {base_model!r})  # the base model, relative to this directory\n"
            f"model = PeftModel.from_pretrained({model_class}.from_pretrained(base_dir{head}), adapter_dir)\n"
            "# or, where the run's directories have not moved (adapter_config.json names the base by its path):\n"
            f"model = {auto_class}.from_pretrained(adapter_dir{head})\n")


def pretrain_card(model: ModelConfig, train: PretrainConfig, meta: dict, metrics: dict, tokenizer,
                  tokenize_name: str) -> Card:
    tokens = meta["train_rows"] * meta["seq_len"]
    return Card(
        title=f"lmforge {model.name}: a Llama-style base language model",
        summary=(f"A {metrics.get('num_parameters', 0) / 1e6:.2f}M-parameter decoder-only causal language model "
                 "(LlamaForCausalLM) trained from random initialisation by lmforge's pretrain step."),
        library="transformers", pipeline_tag="text-generation", tags=["lmforge", "llama", "pretrained"],
        data=[f"the tokenize step's output `{tokenize_name}`: {meta['train_rows']:,} training rows of "
              f"{meta['seq_len']} tokens ({tokens:,} tokens), {meta['val_rows']:,} validation rows",
              f"byte-level BPE vocabulary of {meta['vocab_size']:,} ids; every document ends with EOS"],
        method={"objective": "next-token prediction (pretraining)", "architecture": architecture(model),
                "optimisation": optimisation(train, "sequences"), "seed": train.seed},
        metrics=card_metrics(metrics), chat=chat_note(tokenizer, trained_on_chat=False),
        usage=causal_lm_usage())


def architecture(model: ModelConfig) -> str:
    return (f"{model.num_layers} layers, width {model.hidden_size}, MLP {model.intermediate_size}, {model.num_heads} "
            f"heads ({model.num_kv_heads} key/value), {model.max_position_embeddings} positions, tied embeddings: "
            f"{model.tie_embeddings}")


def optimisation(cfg: TrainConfig, examples: str) -> str:
    return (f"AdamW, lr {cfg.lr} (cosine to {cfg.min_lr_ratio}x after {cfg.warmup_steps} warm-up steps), weight "
            f"decay {cfg.weight_decay}, steps: {cfg.max_steps} of {cfg.global_batch_size} {examples}, DeepSpeed "
            f"ZeRO-{cfg.zero_stage}, {cfg.precision}")


def task_data(task: TaskConfig) -> list[str]:
    """The task's records as the finetune step knows them."""
    if task.builtin:
        return [f"built-in task '{task.builtin}' (Python standard-library functions labelled by package: "
                f"{', '.join(task.stdlib.packages)})"]
    files = [("training", task.train_path), ("validation", task.val_path), ("test", task.test_path)]
    return [f"{role} records: `{without_credentials(path)}`" for role, path in files if path] + \
        ([f"columns renamed: {task.fields}"] if task.fields else [])


def finetune_method(cfg: FinetuneConfig, objective: str) -> dict:
    in_full = f", trained in full: {', '.join(cfg.lora.modules_to_save)}" if cfg.lora.modules_to_save else ""
    details = {"lora": f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, on "
                       f"{', '.join(sorted(cfg.lora.target_modules))}{in_full}",
               "prefix": f"prefix tuning, {cfg.prefix.num_virtual_tokens} virtual tokens per layer"
                         + (", MLP reparameterisation" if cfg.prefix.prefix_projection else ""),
               "full": "full fine-tuning (every weight)"}
    token = "the mean hidden state of the prompt's tokens" if cfg.pooling == "mean" else "the last token's hidden state"
    target = (f"a sequence-classification head on {token}" if objective == "classifier"
              else "the target tokens after the prompt (loss on the target only)")
    return {"method": details[cfg.method], "objective": target, "start": f"{cfg.init} weights",
            "max length": f"{cfg.max_length} tokens (prompt and target)", "optimisation": optimisation(cfg, "examples"),
            "seed": cfg.seed}


def finetune_card(kind: str, cfg: FinetuneConfig, task: TaskConfig, objective: str, labels: list[str] | None,
                  metrics: dict, tokenizer, model_dir: Path, base_dir: Path) -> Card:
    """The card of a finetune step's `kind` directory ('adapter', 'merged' or 'model')."""
    classifier = objective == "classifier"
    base = os.path.relpath(Path(base_dir).resolve(), Path(model_dir).resolve())
    what = {"adapter": f"a PEFT {cfg.method} adapter for its base model", "model": "a fully fine-tuned model",
            "merged": "the LoRA adapter merged into its base model's weights (a plain transformers model)"}[kind]
    prompt = "conversations (the tokenizer's chat template)" if task.kind == "chat" else repr(task.prompt_template)
    pooled = classifier and cfg.pooling == "mean"
    if kind == "adapter" and pooled:  # PEFT would rebuild Llama's last-token head: use the merged export
        usage = "# the adapter of a mean-pooled head; load the merged model beside it:\n" + classifier_usage(
            True, "path/to/this/directory/../merged")
    elif kind == "adapter":
        usage = adapter_usage(base, classifier, labels, tokenizer.pad_token_id)
    else:
        usage = classifier_usage(pooled) if classifier else causal_lm_usage()
    return Card(
        title=f"lmforge fine-tuned model ({kind}): {task.kind}",
        summary=(f"This directory is {what}, fine-tuned by lmforge's finetune step for a {task.kind} task"
                 + (f" with the labels {', '.join(labels)}" if labels else "") + f". Prompt format: {prompt}."),
        library="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=["lmforge", "llama", METHOD_TAGS[cfg.method], task.kind], base_model=base,
        data=task_data(task) + [f"base model: `{base}` (the pretrain step's export, relative to this directory)"],
        method=finetune_method(cfg, objective), metrics=card_metrics(metrics),
        chat=chat_note(tokenizer, task.kind == "chat", f"prompts of the form {prompt}"), usage=usage)
