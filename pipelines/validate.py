"""Cross-field checks of the typed config, run before any Ray or training work.

Each failure is one UserError whose message starts with the config key at fault.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from conf.schema import (Bounds, Config, DataConfig, FinetuneConfig, ModelConfig, TokenizerConfig, TrainConfig,
                         closest_key, unknown_keys, usable_folder)
from pipelines import dag
from pipelines.memory import GiB, num_adapter_parameters, training_memory, worker_memory
from tasks import augment, earlystop, finetune, taskdata, tokenizer_files
from tasks.common import UserError
from tasks.tokenize import special_tokens

PRECISIONS = ("auto", "bf16", "fp32")
ON_ERROR = ("raise", "skip")
ON_NONFINITE = ("stop", "skip")
ON_UNREACHABLE = ("fail", "journal")


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


MAX_AUGMENTED_COPIES = 100


def check_bounds(tree, prefix: str = "") -> None:
    """Every numeric field of the config tree against the bounds declared on it (conf/schema.py: `bounded`)."""
    fields = {f.name: f for f in dataclasses.fields(tree)} if dataclasses.is_dataclass(tree) else {}
    items = tree.items() if isinstance(tree, dict) else ((name, getattr(tree, name)) for name in fields)
    for name, value in items:
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            check_bounds(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name in fields:
            bounds = fields[name].metadata.get("bounds")
            if bounds:
                check_value(key, value, bounds)


def check_value(key: str, value: float, bounds: Bounds) -> None:
    check(value >= bounds.low, f"{key}: must be at least {bounds.low:g}, got {value}")
    if bounds.below is not None:
        check(value < bounds.below, f"{key}: must be below {bounds.below:g}, got {value}")
    if bounds.at_most is not None:
        got = f"{value:g} ({bounds.why})" if bounds.why else f"{value}"
        check(value <= bounds.at_most, f"{key}: must be at most {bounds.at_most:g}, got {got}")


def validate(cfg: Config) -> None:
    check_bounds(cfg)
    # no part of the path may be a file (writability is checked where the run starts: a submitted job's
    # root need not exist on the submitting machine)
    check("://" in cfg.paths.root or usable_folder(cfg.paths.root, writable=False),
          f"paths.root: '{cfg.paths.root}' cannot be a folder (it, or a part of its path, is a file); give "
          "another paths.root")
    check("://" not in cfg.paths.root or cfg.paths.store in ("", cfg.paths.root),
          f"paths.store: with a URI paths.root ({cfg.paths.root}) the root is the store; leave paths.store empty")
    check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", cfg.experiment_name) is not None and ".." not in cfg.experiment_name,
          f"experiment_name: '{cfg.experiment_name}' must be 1-64 letters, digits, '_', '.' or '-' (no path parts)")
    validate_tracking(cfg)
    validate_data(cfg.data)
    for name in cfg.decontaminate.sets:
        check(name in taskdata.SPLITS, f"decontaminate.sets: '{name}' is not a task split {taskdata.SPLITS}")
    tok, model = cfg.tokenizer, cfg.model
    vocab_size = validate_tokenizer(tok)
    check(tok.seq_len <= model.max_position_embeddings,
          f"tokenizer.seq_len: {tok.seq_len} exceeds model.max_position_embeddings ({model.max_position_embeddings})")
    check(model.hidden_size % model.num_heads == 0,
          f"model.hidden_size: {model.hidden_size} is not divisible by model.num_heads ({model.num_heads})")
    check(model.num_heads % model.num_kv_heads == 0,
          f"model.num_kv_heads: {model.num_kv_heads} does not divide model.num_heads ({model.num_heads})")
    validate_train("pretrain", cfg.pretrain)
    check_memory("pretrain", cfg.pretrain, model, vocab_size, ("seq_len", tok.seq_len), worker_memory(cfg, cfg.pretrain))
    branches = {f"finetunes.{name}": ft for name, ft in cfg.finetunes.items()} or {"finetune": cfg.finetune}
    for key, ft in branches.items():
        check(key == "finetune" or re.fullmatch(r"finetunes\.[a-z0-9_]{1,32}", key) is not None,
              f"{key}: a branch name is 1-32 lower-case letters, digits or underscores")
        validate_finetune(key, ft, model.max_position_embeddings)
        validate_techniques(key, ft, cfg.task.kind)
        check_memory(key, ft, model, vocab_size, ("max_length", ft.max_length), worker_memory(cfg, ft),
                     num_adapter_parameters(ft, model, vocab_size))
        check(not ft.replay_fraction or model.tie_embeddings or finetune.resolve_objective(ft, cfg.task.kind) == "lm",
              f"{key}.replay_fraction: replay with a classification head reads the language model through the "
              f"tied embeddings; set model.tie_embeddings=true or {key}.objective=lm")
    validate_task(cfg)
    validate_eval(cfg)
    dag.steps_for(cfg)  # an `until` that names no step


def validate_data(data: DataConfig) -> None:
    check(data.on_error in ON_ERROR, f"data.on_error: must be one of {ON_ERROR}, got '{data.on_error}'")
    check(not (data.paths and data.builtin) or data.mix_builtin,
          f"data.paths: your files are named while the built-in corpora {data.builtin} are active too (the default "
          f"data=stdlib, capped at data.max_bytes={data.max_bytes}); add 'override /data: files' to the experiment's "
          f"defaults (or data=files on the command line), or set data.mix_builtin=true to mix them")
    weights = data.weights
    check(not weights or (len(weights) == len(data.paths) and min(weights) >= 0 and max(weights) > 0),
          f"data.weights: one weight >= 0 per data.paths entry ({len(data.paths)}), not all 0; got {weights}")
    near = data.near_dedup
    check(near.bands * near.band_rows == near.num_perm, f"data.near_dedup.num_perm: must equal bands x band_rows "
                                                        f"({near.bands} x {near.band_rows}), got {near.num_perm}")
    filters = data.filters
    for code in filters.languages:
        check(re.fullmatch(r"[a-z]{2,3}(_[A-Za-z]{4})?", str(code)) is not None,
              f"data.filters.languages: '{code}' is not a language code of the identifier (ISO 639: en, de, zh, ...)")
    check(not filters.language_model or Path(filters.language_model).is_file(),
          f"data.filters.language_model: no such file '{filters.language_model}'")


def validate_tracking(cfg: Config) -> None:
    track = cfg.tracking
    check(track.on_unreachable in ON_UNREACHABLE,
          f"tracking.on_unreachable: must be one of {ON_UNREACHABLE}, got '{track.on_unreachable}'")
    # MLflow keeps 'latest' and 'v<number>' for itself (models:/name@latest, version references)
    check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,254}", track.model_alias) is not None
          and track.model_alias.lower() != "latest" and not re.fullmatch(r"[vV]\d+", track.model_alias),
          f"tracking.model_alias: '{track.model_alias}' must be a name (letters, digits, '_', '-'), not 'latest' or v<N>")
    check(track.registered_model == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", track.registered_model)
          is not None, f"tracking.registered_model: '{track.registered_model}' must be 1-100 letters, digits, '_', '.' or '-'")


def validate_tokenizer(tok: TokenizerConfig) -> int:
    """A reused tokenizer (tokenizer.path) is loaded now: a missing file, or no EOS or pad token,
    stops the run here. A trained one: its special tokens and chat template. Returns the vocabulary size."""
    check(0 < tok.val_fraction < 1, f"tokenizer.val_fraction: must be within (0, 1), got {tok.val_fraction}")
    check(tok.seq_len >= 2, f"tokenizer.seq_len: must be at least 2, got {tok.seq_len}")
    if tok.path:
        return len(tokenizer_files.load(tok))
    for role in ("pad", "bos", "eos"):
        check(bool(getattr(tok, f"{role}_token")), f"tokenizer.{role}_token: must not be empty")
    check(all(tok.additional_special_tokens),
          f"tokenizer.additional_special_tokens: an empty token in {list(tok.additional_special_tokens)}")
    names = special_tokens(tok)
    check(tok.vocab_size >= 256 + len(names),
          f"tokenizer.vocab_size: {tok.vocab_size} is below the byte alphabet plus special tokens ({256 + len(names)})")
    check(tok.vocab_size <= 2**32, f"tokenizer.vocab_size: {tok.vocab_size} is too large")
    check_template("tokenizer.chat_template", tok.chat_template)
    return tok.vocab_size


def check_template(key: str, template: str) -> None:
    """A Jinja template from the config parses (sandboxed: it runs no code)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().from_string(template)
    except TemplateSyntaxError as error:
        raise UserError(f"{key}: {error.message} (line {error.lineno})") from None


def validate_finetune(key: str, cfg: FinetuneConfig, max_positions: int) -> None:
    validate_train(key, cfg)
    check(cfg.method in finetune.FINETUNE_METHODS,
          f"{key}.method: unknown method '{cfg.method}' (known: {', '.join(finetune.FINETUNE_METHODS)})")
    check(cfg.init in ("pretrained", "random"), f"{key}.init: must be 'pretrained' or 'random', got '{cfg.init}'")
    check(cfg.init == "pretrained" or cfg.method == "full",
          f"{key}.init: 'random' (the no-pretraining control) needs {key}.method=full; adapters on random "
          f"weights would be exported without those weights")
    check(cfg.max_epochs >= 0, f"{key}.max_epochs: must be >= 0 (0: use max_steps), got {cfg.max_epochs}")
    extra = cfg.prefix.num_virtual_tokens if cfg.method == "prefix" else 0
    check(cfg.max_length + extra <= max_positions,
          f"{key}.max_length: {cfg.max_length} (+{extra} virtual tokens) exceeds "
          f"model.max_position_embeddings ({max_positions})")


def check_memory(key: str, cfg: TrainConfig, model: ModelConfig, vocab_size: int, length: tuple[str, int],
                 available: float | None, num_adapter_params: int = 0) -> None:
    """Stop when training_memory exceeds what a worker has here (`available`; None: not known)."""
    parts = training_memory(cfg, model, vocab_size, length[1], num_adapter_params)
    if available is None or sum(parts.values()) <= available:
        return
    gib = {name: f"{value / GiB:.2f}" for name, value in parts.items()}
    raise UserError(f"{key}: about {sum(parts.values()) / GiB:.1f} GiB per worker (params {gib['params']}, optimizer "
                    f"{gib['optimizer']}, activations {gib['activations']} for micro_batch_size={cfg.micro_batch_size} "
                    f"x {length[0]}={length[1]}) but a worker has about {available / GiB:.1f} GiB here; lower "
                    f"{key}.micro_batch_size or use a smaller model / higher zero_stage")


def validate_task(cfg: Config) -> None:
    task = cfg.task
    check(task.kind in taskdata.FIELDS, f"task.kind: must be one of {tuple(taskdata.FIELDS)}, got '{task.kind}'")
    input_field = taskdata.FIELDS[task.kind][0]
    check(task.kind == "chat" or "{" + input_field + "}" in task.prompt_template,
          f"task.prompt_template: must contain '{{{input_field}}}' for task.kind={task.kind}")
    if task.kind == "chat":
        check_template("task.chat_template", task.chat_template)
    unknown = set(task.fields) - set(taskdata.FIELDS[task.kind])
    check(not unknown, f"task.fields: {sorted(unknown)} are not fields of task.kind={task.kind} "
                       f"({', '.join(taskdata.FIELDS[task.kind])})")
    check(0 < task.test_fraction < 1 and 0 < task.val_fraction < 1, "task.test_fraction / task.val_fraction: must be within (0, 1)")
    named = [key for key in ("train_path", "val_path", "test_path") if getattr(task, key)]
    check(task.builtin is None or not named,
          f"task.{named[0] if named else 'train_path'}: your task file is named while the built-in task "
          f"'{task.builtin}' is active and would ignore it; add 'override /task: jsonl' to the experiment's "
          f"defaults (or task=jsonl on the command line)")
    if task.builtin is None:  # read and split the user's files now: bad data stops the run before any work
        check(bool(task.train_path), "task.train_path: required when task.builtin is not set")
        _, warnings = taskdata.data_report(taskdata.prepare(task), task.kind)
        for warning in warnings:
            print(f"warning: task: {warning}", file=sys.stderr, flush=True)
    else:
        check(task.builtin in taskdata.BUILTIN_TASKS,
              f"task.builtin: unknown data set '{task.builtin}' (known: {', '.join(taskdata.BUILTIN_TASKS)})")
        kind = taskdata.BUILTIN_TASKS[task.builtin][0]
        check(task.kind == kind, f"task.kind: the '{task.builtin}' data set is a {kind} task; set task.kind={kind}")


def validate_techniques(key: str, cfg: FinetuneConfig, kind: str) -> None:
    stopping = cfg.early_stopping
    check(stopping.metric in ("auto", *earlystop.HIGHER_IS_BETTER),
          f"{key}.early_stopping.metric: must be one of {('auto', *earlystop.HIGHER_IS_BETTER)}, got '{stopping.metric}'")
    check(cfg.objective in finetune.OBJECTIVES,
          f"{key}.objective: must be one of {finetune.OBJECTIVES}, got '{cfg.objective}'")
    check(cfg.objective != "classifier" or kind == "classification",
          f"{key}.objective: 'classifier' needs task.kind=classification (use 'lm' or 'auto' for {kind})")
    check(cfg.pooling in finetune.POOLINGS, f"{key}.pooling: must be one of {finetune.POOLINGS}, got '{cfg.pooling}'")
    check(cfg.pooling == "last" or (finetune.resolve_objective(cfg, kind) == "classifier" and cfg.method != "prefix"),
          f"{key}.pooling: 'mean' needs the classifier objective with LoRA or full fine-tuning; set {key}.pooling=last")
    check(stopping.metric != "val_accuracy" or kind == "classification",
          f"{key}.early_stopping.metric: val_accuracy needs task.kind=classification")
    check(cfg.augment.copies <= MAX_AUGMENTED_COPIES,
          f"{key}.augment.copies: at most {MAX_AUGMENTED_COPIES}, got {cfg.augment.copies}")
    check(cfg.augment.copies == 0 or kind != "chat", f"{key}.augment.copies: augmentation needs task.kind "
                                                     f"classification or generation")


def validate_eval(cfg: Config) -> None:
    check(cfg.eval.ngram_order <= 4, f"eval.ngram_order: at most 4 (0: no n-gram baseline), got {cfg.eval.ngram_order}")
    unknown = set(cfg.eval.robustness.perturbations) - set(augment.PERTURBATIONS)
    check(not unknown, f"eval.robustness.perturbations: unknown {sorted(unknown)} (known: {', '.join(augment.PERTURBATIONS)})")
    check(not cfg.eval.robustness.perturbations or cfg.task.kind != "chat",
          "eval.robustness.perturbations: needs task.kind classification or generation")
    members = cfg.eval.ensemble
    if members:
        check(len(set(members)) == len(members) >= 2, f"eval.ensemble: needs two or more different branches, got {members}")
        missing = [m for m in members if m not in cfg.finetunes]
        check(not missing, f"eval.ensemble: {missing} are not branches of finetunes ({', '.join(cfg.finetunes) or 'none'})")


def check_composed(dict_cfg, choices: dict) -> None:
    """Checks of the composed config before it becomes dataclasses (which would drop what they do not
    declare): unknown keys, and a method switched without its defaults. `choices`: Hydra's group choices."""
    check_known_keys(dict_cfg)
    check_method_defaults(dict_cfg, choices)


def check_known_keys(dict_cfg: DictConfig) -> None:
    """Stop on a key the schema does not declare (added with `+`, or in a config file), naming the closest real one."""
    unknown = unknown_keys(OmegaConf.to_container(dict_cfg, resolve=False))
    if unknown:
        key = unknown[0]
        suggestion = closest_key(key)
        hint = f"did you mean {suggestion}?" if suggestion else "see conf/schema.py for the settings"
        more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise UserError(f"{key}: not a setting lmforge knows, {hint}{more}")


def check_method_defaults(dict_cfg: DictConfig, choices: dict) -> None:
    """Stop when a fine-tuning section's method was switched (finetune.method=full) while its learning
    rate is still the one of the method file it was composed from (conf/finetune/lora.yaml's 0.003 is six
    times full fine-tuning's): `finetune=full` brings that method's defaults, or set the lr too."""
    conf_dir = Path(__file__).resolve().parent.parent / "conf" / "finetune"
    for group, option in choices.items():
        if not (group == "finetune" or group.startswith("finetune@")) or not option:
            continue
        key = group.split("@", 1)[1] if "@" in group else "finetune"
        section = OmegaConf.select(dict_cfg, key)
        defaults_file = conf_dir / f"{option}.yaml"
        if section is None or not defaults_file.is_file():
            continue
        defaults = OmegaConf.load(defaults_file)
        method_file = conf_dir / f"{section.method}.yaml"
        if section.method == defaults.get("method") or not method_file.is_file():
            continue
        method_lr = OmegaConf.load(method_file).get("lr")
        if section.lr == defaults.get("lr") and section.lr != method_lr:
            choose = f"{group.split('@')[0]}@{key}={section.method}" if "@" in group else f"finetune={section.method}"
            raise UserError(f"{key}.method={section.method}: its lr {section.lr} comes from conf/finetune/{option}.yaml "
                            f"({option}'s default; {section.method}'s is {method_lr}); write {choose} to take "
                            f"{section.method}'s defaults, or set {key}.lr as well")
