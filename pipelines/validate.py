"""Cross-field checks of the typed config, run before any Ray or training work.

Each failure is one UserError whose message starts with the config key at fault.
"""
from __future__ import annotations

import re

from conf.schema import Config, FinetuneConfig, LoraConfig, TrainConfig
from tasks import finetune, taskdata
from tasks.common import UserError
from tasks.tokenize import SPECIAL_TOKENS

PRECISIONS = ("bf16", "fp32")
ON_ERROR = ("raise", "skip")
ON_NONFINITE = ("stop", "skip")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def validate_train(key: str, cfg: TrainConfig) -> None:
    check(cfg.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage: must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    check(cfg.precision in PRECISIONS, f"{key}.precision: must be one of {PRECISIONS}, got '{cfg.precision}'")
    per_pass = cfg.micro_batch_size * cfg.num_workers
    check(cfg.global_batch_size % per_pass == 0,
          f"{key}.global_batch_size: {cfg.global_batch_size} is not a multiple of micro_batch_size x num_workers "
          f"({cfg.micro_batch_size} x {cfg.num_workers})")
    check(cfg.checkpoint_every >= 0 and cfg.checkpoint_every % cfg.log_every == 0,
          f"{key}.checkpoint_every: must be 0 or a multiple of {key}.log_every ({cfg.log_every}), got {cfg.checkpoint_every}")
    check(cfg.max_failures == 0 or cfg.checkpoint_every > 0,
          f"{key}.max_failures: restarts need checkpoints; set {key}.checkpoint_every")
    check(0 <= cfg.warmup_steps <= cfg.max_steps, f"{key}.warmup_steps: must be within 0..max_steps ({cfg.max_steps})")
    check(0 <= cfg.min_lr_ratio <= 1, f"{key}.min_lr_ratio: must be within 0..1")
    check(cfg.on_nonfinite in ON_NONFINITE,
          f"{key}.on_nonfinite: must be one of {ON_NONFINITE}, got '{cfg.on_nonfinite}'")
    check(not cfg.offload_optimizer or cfg.zero_stage >= 1,
          f"{key}.offload_optimizer: needs {key}.zero_stage 1, 2 or 3 (DeepSpeed offloads ZeRO partitions)")


# The smallest allowed value of every numeric setting, by field name (the same name means the
# same thing in every section). Checked first, so later checks never divide by zero.
LOWER_BOUNDS = {
    "hidden_size": 1, "intermediate_size": 1, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1,
    "max_position_embeddings": 2, "rope_theta": 1, "vocab_size": 1, "min_frequency": 1, "train_sample_bytes": 1,
    "seq_len": 2, "max_bytes": 0, "min_chars": 0, "docs_per_shard": 1, "docs_per_task": 1, "zero_stage": 0,
    "micro_batch_size": 1, "global_batch_size": 1, "max_steps": 1, "lr": 1e-12, "min_lr_ratio": 0,
    "warmup_steps": 0, "weight_decay": 0, "grad_clip": 0, "eval_every": 1, "eval_batches": 1, "seed": 0,
    "max_skipped_steps": 1, "log_every": 1, "checkpoint_every": 0, "max_failures": 0, "keep_checkpoints": 1,
    "num_workers": 1, "cpus_per_worker": 1, "peak_tflops": 0, "r": 1, "alpha": 1, "dropout": 0,
    "num_virtual_tokens": 1, "max_length": 2, "max_per_label": 1, "min_lines": 1, "max_chars": 1,
    "test_fraction": 0, "val_fraction": 0, "max_examples": 1, "ppl_batches": 1, "num_samples": 0,
    "sample_prompt_tokens": 1, "max_new_tokens": 1, "num_threads": 1, "num_cpus": 1,
}


def check_bounds(tree, prefix: str = "") -> None:
    """Every numeric field of the config tree against LOWER_BOUNDS."""
    import dataclasses

    items = tree.items() if isinstance(tree, dict) else (
        (f.name, getattr(tree, f.name)) for f in dataclasses.fields(tree)) if dataclasses.is_dataclass(tree) else ()
    for name, value in items:
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            check_bounds(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name in LOWER_BOUNDS:
            check(value >= LOWER_BOUNDS[name], f"{key}: must be at least {LOWER_BOUNDS[name]:g}, got {value}")
    if isinstance(tree, LoraConfig):
        check(tree.dropout < 1, f"{prefix}dropout: must be below 1, got {tree.dropout}")


def validate(cfg: Config) -> None:
    check_bounds(cfg)
    check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", cfg.experiment_name) is not None and ".." not in cfg.experiment_name,
          f"experiment_name: '{cfg.experiment_name}' must be 1-64 letters, digits, '_', '.' or '-' (no path parts)")
    check(cfg.data.on_error in ON_ERROR, f"data.on_error: must be one of {ON_ERROR}, got '{cfg.data.on_error}'")
    tok, model = cfg.tokenizer, cfg.model
    check(tok.vocab_size >= 256 + len(SPECIAL_TOKENS),
          f"tokenizer.vocab_size: {tok.vocab_size} is below the byte alphabet plus special tokens ({256 + len(SPECIAL_TOKENS)})")
    check(tok.vocab_size <= 2**32, f"tokenizer.vocab_size: {tok.vocab_size} is too large")
    check(0 < tok.val_fraction < 1, f"tokenizer.val_fraction: must be within (0, 1), got {tok.val_fraction}")
    check(tok.seq_len >= 2, f"tokenizer.seq_len: must be at least 2, got {tok.seq_len}")
    check(tok.seq_len <= model.max_position_embeddings,
          f"tokenizer.seq_len: {tok.seq_len} exceeds model.max_position_embeddings ({model.max_position_embeddings})")
    check(model.hidden_size % model.num_heads == 0,
          f"model.hidden_size: {model.hidden_size} is not divisible by model.num_heads ({model.num_heads})")
    check(model.num_heads % model.num_kv_heads == 0,
          f"model.num_kv_heads: {model.num_kv_heads} does not divide model.num_heads ({model.num_heads})")
    validate_train("pretrain", cfg.pretrain)
    branches = {f"finetunes.{name}": ft for name, ft in cfg.finetunes.items()} or {"finetune": cfg.finetune}
    for key, ft in branches.items():
        check(key == "finetune" or re.fullmatch(r"finetunes\.[a-z0-9_]{1,32}", key) is not None,
              f"{key}: a branch name is 1-32 lower-case letters, digits or underscores")
        validate_finetune(key, ft, model.max_position_embeddings)
    validate_task(cfg)


def validate_finetune(key: str, cfg: FinetuneConfig, max_positions: int) -> None:
    validate_train(key, cfg)
    check(cfg.method in finetune.FINETUNE_METHODS,
          f"{key}.method: unknown method '{cfg.method}' (known: {', '.join(finetune.FINETUNE_METHODS)})")
    extra = cfg.prefix.num_virtual_tokens if cfg.method == "prefix" else 0
    check(cfg.max_length + extra <= max_positions,
          f"{key}.max_length: {cfg.max_length} (+{extra} virtual tokens) exceeds "
          f"model.max_position_embeddings ({max_positions})")


def validate_task(cfg: Config) -> None:
    task = cfg.task
    check(task.kind in taskdata.FIELDS, f"task.kind: must be one of {tuple(taskdata.FIELDS)}, got '{task.kind}'")
    input_field = taskdata.FIELDS[task.kind][0]
    check(task.kind == "chat" or "{" + input_field + "}" in task.prompt_template,
          f"task.prompt_template: must contain '{{{input_field}}}' for task.kind={task.kind}")
    if task.kind == "chat":
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().from_string(task.chat_template)
        except TemplateSyntaxError as error:
            raise UserError(f"task.chat_template: {error.message} (line {error.lineno})") from None
    unknown = set(task.fields) - set(taskdata.FIELDS[task.kind])
    check(not unknown, f"task.fields: {sorted(unknown)} are not fields of task.kind={task.kind} "
                       f"({', '.join(taskdata.FIELDS[task.kind])})")
    check(0 < task.test_fraction < 1 and 0 < task.val_fraction < 1, "task.test_fraction / task.val_fraction: must be within (0, 1)")
    if task.builtin is None:  # read the user's files now: a bad record stops the run before any training
        check(bool(task.train_path), "task.train_path: required when task.builtin is not set")
        for key in ("train_path", "val_path", "test_path"):
            if getattr(task, key):
                taskdata.load_records(getattr(task, key), task, f"task.{key}")
    else:
        check(task.builtin in ("stdlib_packages",), f"task.builtin: unknown data set '{task.builtin}' (known: stdlib_packages)")
        check(task.kind == "classification", "task.kind: the 'stdlib_packages' data set is a classification task")
