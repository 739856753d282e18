"""taskdata: the fine-tuning data set, validated and split into train/val/test JSONL.

Records are classification ({"text", "label"}) or generation ({"prompt", "completion"}),
read from the user's JSONL files or built from Python itself ('stdlib_packages': which
standard-library package a function's source comes from). A record with a missing or
wrongly typed field is reported with its file and line number.

    run(cfg: TaskConfig, inputs={}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import ast
import collections
import sysconfig
import textwrap
from pathlib import Path

from conf.schema import StdlibTaskConfig, TaskConfig
from tasks.common import TaskContext, UserError, hash_fraction, iter_jsonl, read_jsonl, write_json, write_jsonl

FIELDS = {"classification": ("text", "label"), "generation": ("prompt", "completion")}
SKIPPED_DIRS = {"test", "tests", "idle_test", "__pycache__"}


def load_records(path: str, kind: str, key: str) -> list[dict]:
    """Read and check a JSONL file; UserError names the file, line and field."""
    if kind not in FIELDS:
        raise UserError(f"task.kind: unknown kind '{kind}' (known: {', '.join(FIELDS)})")
    if not Path(path).is_file():
        raise UserError(f"{key}: no such file '{path}'")
    records = []
    for lineno, record in iter_jsonl(path):
        for name in FIELDS[kind]:
            if not isinstance(record, dict) or name not in record:
                raise UserError(f"{path}:{lineno}: missing field '{name}' (task.kind={kind})")
            if not isinstance(record[name], str) or not record[name].strip():
                raise UserError(f"{path}:{lineno}: field '{name}' must be a non-empty string")
        records.append({name: record[name] for name in FIELDS[kind]})
    if not records:
        raise UserError(f"{key}: '{path}' holds no records")
    return records


def stdlib_function_records(cfg: StdlibTaskConfig, seed: int) -> list[dict]:
    """Functions of the chosen standard-library packages, labelled by package, balanced by sampling."""
    root = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for package in cfg.packages:
        found = []
        package_dir = root / package
        files = [root / f"{package}.py"] if not package_dir.is_dir() else sorted(package_dir.rglob("*.py"))
        for path in files:
            if not path.is_file() or SKIPPED_DIRS & set(path.relative_to(root).parts):
                continue
            source = path.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        node.end_lineno - node.lineno + 1 >= cfg.min_lines:
                    text = textwrap.dedent(ast.get_source_segment(source, node, padded=True) or "")
                    key = f"{path.relative_to(root)}:{node.lineno}"
                    found.append((hash_fraction(key, seed), {"text": text[: cfg.max_chars], "label": package}))
        if not found:
            raise UserError(f"task.stdlib.packages: no functions found in '{package}'")
        records += [r for _, r in sorted(found, key=lambda item: item[0])[: cfg.max_per_label]]
    return records


def record_key(record: dict) -> str:
    return "\x1f".join(str(v) for v in record.values())


def split(records: list[dict], fraction: float, seed: int, salt: str) -> tuple[list[dict], list[dict]]:
    """(rest, held out) by a hash of the record's content: stable under reordering and appends."""
    rest, held = [], []
    for record in records:
        (held if hash_fraction(salt + record_key(record), seed) < fraction else rest).append(record)
    return rest, held


def shuffled(records: list[dict], seed: int) -> list[dict]:
    """A seeded order that does not depend on the input order (so the first N of a split are a fair sample)."""
    return sorted(records, key=lambda r: (hash_fraction("order" + record_key(r), seed), record_key(r)))


def prepare(cfg: TaskConfig) -> dict[str, list[dict]]:
    if cfg.kind not in FIELDS:
        raise UserError(f"task.kind: unknown kind '{cfg.kind}' (known: {', '.join(FIELDS)})")
    if cfg.builtin == "stdlib_packages":
        records, test = stdlib_function_records(cfg.stdlib, cfg.seed), None
    elif cfg.builtin is not None:
        raise UserError(f"task.builtin: unknown data set '{cfg.builtin}' (known: stdlib_packages)")
    else:
        if not cfg.train_path:
            raise UserError("task.train_path: required when task.builtin is not set")
        records = load_records(cfg.train_path, cfg.kind, "task.train_path")
        test = load_records(cfg.test_path, cfg.kind, "task.test_path") if cfg.test_path else None
    if test is None:
        records, test = split(records, cfg.test_fraction, cfg.seed, "test")
    train, val = split(records, cfg.val_fraction, cfg.seed, "val")
    for name, part in (("train", train), ("val", val), ("test", test)):
        if not part:
            raise UserError(f"task: the {name} split is empty ({len(records)} records; check task.*_fraction)")
    return {"train": shuffled(train, cfg.seed), "val": shuffled(val, cfg.seed), "test": shuffled(test, cfg.seed)}


def run(cfg: TaskConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    splits = prepare(cfg)
    for name, records in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", records)
    metrics = {f"{name}_records": len(records) for name, records in splits.items()}
    if cfg.kind == "classification":
        counts = collections.Counter(r["label"] for r in splits["train"])
        write_json(out_dir / "labels.json", sorted(counts))
        metrics["num_labels"] = len(counts)
        metrics["majority_share"] = counts.most_common(1)[0][1] / len(splits["train"])
    ctx.say(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics


def load_split(taskdata_dir: Path, name: str) -> list[dict]:
    return read_jsonl(Path(taskdata_dir) / f"{name}.jsonl")


def load_labels(taskdata_dir: Path) -> list[str]:
    import json

    return json.loads((Path(taskdata_dir) / "labels.json").read_text())


def render(record: dict, cfg: TaskConfig) -> tuple[str, str, str, str]:
    """Text before the input, the input, text after it, and the target of one record."""
    input_field, target_field = FIELDS[cfg.kind]
    head, _, tail = cfg.prompt_template.partition("{" + input_field + "}")
    return head, record[input_field], tail, " " + record[target_field]


def encode_example(tokenizer, record: dict, cfg: TaskConfig, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + target + EOS and the index where the target starts. An over-long
    input is cut from its end so the template's tail and the whole target always fit."""
    head, body, tail, target = render(record, cfg)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []
    head_ids, body_ids, tail_ids = encode(head), encode(body), encode(tail)
    target_ids = encode(target) + [tokenizer.eos_token_id]
    room = max_length - len(head_ids) - len(tail_ids) - len(target_ids)
    if room < 1:
        raise UserError(f"finetune.max_length ({max_length}) leaves no room for the input of a record "
                        f"(template and target take {max_length - room} tokens)")
    prompt_ids = head_ids + body_ids[:room] + tail_ids
    return prompt_ids + target_ids, len(prompt_ids)
