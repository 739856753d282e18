"""taskdata: the fine-tuning data set, validated and split into train/val/test JSONL.

Records are classification ({"text", "label"}), generation ({"prompt", "completion"}) or chat
({"messages": [{"role", "content"}, ...]}, the last message the assistant's answer), read
from the user's JSONL, CSV/TSV or Parquet files (local, or any pyarrow.fs URI), with columns
mapped by `task.fields`, or built from Python itself ('stdlib_packages': which
standard-library package a function's source comes from; 'stdlib_chat': what a function does,
answered with its docstring's first sentence, tasks/stdlib_chat.py). A record with a missing or
wrongly typed field is reported with its file and line (or row) number.

    run(cfg: TaskConfig, inputs={}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import ast
import collections
import sysconfig
import textwrap
from pathlib import Path

from conf.schema import StdlibTaskConfig, TaskConfig
from tasks import stdlib_chat
from tasks.common import (TaskContext, UserError, filesystem, first_line, hash_fraction, iter_jsonl, read_jsonl,
                          write_json, write_jsonl)

FIELDS = {"classification": ("text", "label"), "generation": ("prompt", "completion"), "chat": ("messages",)}
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")
SKIPPED_DIRS = {"test", "tests", "idle_test", "__pycache__"}


def read_rows(path: str, key: str, header: bool = True) -> list[tuple[str, object]]:
    """(location, row) pairs of a JSONL, CSV/TSV or Parquet file, local or behind a URI. A CSV/TSV file
    without a header row (header=False) gives rows keyed by column position: '0', '1', ..."""
    import csv
    import io

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        fs, inner = filesystem(path)
        if fs.get_file_info(inner).type != pafs.FileType.File:
            raise UserError(f"{key}: no such file '{path}'")
        suffix = Path(inner).suffix.lower()
        if suffix == ".parquet":
            return [(f"row {i + 1}", row) for i, row in enumerate(pq.read_table(inner, filesystem=fs).to_pylist())]
        with fs.open_input_stream(inner) as stream:
            text = stream.read().decode("utf-8")
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{key}: cannot read '{path}': {first_line(error)}") from None
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        if not header:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
            return [(f"line {reader.line_num}", {str(i): cell for i, cell in enumerate(row)}) for row in reader if row]
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        return [(f"line {reader.line_num}", row) for row in reader]
    if suffix not in (".jsonl", ".json"):
        raise UserError(f"{key}: '{path}' is not .jsonl, .csv, .tsv or .parquet")
    return [(f"line {lineno}", row) for lineno, row in iter_jsonl(path, io.BytesIO(text.encode("utf-8")))]


def found_columns(row, tabular: bool, cfg: TaskConfig) -> str:
    """What a record that lacks a field holds instead, and for CSV/TSV how the header was read."""
    if not isinstance(row, dict):
        return f"; the record is a {type(row).__name__}, not an object"
    shown = [str(c) if len(str(c)) <= 40 else str(c)[:37] + "..." for c in list(row)[:8]]
    names = ", ".join(map(repr, shown)) + (", ..." if len(row) > 8 else "")
    if not tabular:
        return f"; its fields: {names}"
    if cfg.header:
        mapping = ", ".join(f"{name}: COLUMN" for name in FIELDS[cfg.kind])
        return (f"; the header row gave the columns {names}: map them with task.fields (on the command line "
                f"+task.fields={{{mapping}}}), or for a file without a header row set task.header=false")
    return f"; {len(row)} columns, named by position ({names}): map them with task.fields, e.g. +task.fields={{text: '1', label: '0'}}"


def check_messages(value, where: str) -> list[dict]:
    import json

    if isinstance(value, str):  # a CSV cell holds the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: 'messages' is not a JSON list") from None
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str) or not message["content"].strip():
            raise UserError(f"{where}: messages[{i}] needs a role in {ROLES} and non-empty string content")
    if value[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's (the answer to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_records(path: str, cfg: TaskConfig, key: str) -> list[dict]:
    """Read and check a data file; UserError names the file, line or row, and field."""
    if cfg.kind not in FIELDS:
        raise UserError(f"task.kind: unknown kind '{cfg.kind}' (known: {', '.join(FIELDS)})")
    records = []
    tabular = Path(path).suffix.lower() in (".csv", ".tsv")
    for location, row in read_rows(path, key, header=cfg.header or not tabular):
        where = f"{path}:{location.split()[-1]}" if location.startswith("line") else f"{path}: {location}"
        record = {}
        for position, name in enumerate(FIELDS[cfg.kind]):
            column = cfg.fields.get(name, name if cfg.header or not tabular else str(position))
            mapped = f" (column '{column}')" if column != name else ""
            if not isinstance(row, dict) or column not in row or row[column] is None:
                raise UserError(f"{where}: missing field '{name}'{mapped} (task.kind={cfg.kind}){found_columns(row, tabular, cfg)}")
            value = row[column]
            if name == "messages":
                value = check_messages(value, where)
            elif name == "label" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            elif name == "label" and isinstance(value, str) and value.strip():
                value = " ".join(value.split())  # 'pos ' and 'pos' are one class
            elif not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: field '{name}'{mapped} must be a non-empty string")
            record[name] = value
        records.append(record)
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
    import json

    return "\x1f".join(v if isinstance(v, str) else json.dumps(v, sort_keys=True) for v in record.values())


def split(records: list[dict], fraction: float, seed: int, salt: str) -> tuple[list[dict], list[dict]]:
    """(rest, held out) by a hash of the record's content: stable under reordering and appends."""
    rest, held = [], []
    for record in records:
        (held if hash_fraction(salt + record_key(record), seed) < fraction else rest).append(record)
    return rest, held


def shuffled(records: list[dict], seed: int) -> list[dict]:
    """A seeded order that does not depend on the input order (so the first N of a split are a fair sample)."""
    return sorted(records, key=lambda r: (hash_fraction("order" + record_key(r), seed), record_key(r)))


BUILTIN_TASKS = {
    "stdlib_packages": ("classification", lambda cfg: stdlib_function_records(cfg.stdlib, cfg.seed)),
    "stdlib_chat": ("chat", lambda cfg: [dict(r) for r in stdlib_chat.records()]),
}
"""task.builtin -> (the task.kind it is, its records): data sets made from Python itself."""


def prepare(cfg: TaskConfig) -> dict[str, list[dict]]:
    if cfg.kind not in FIELDS:
        raise UserError(f"task.kind: unknown kind '{cfg.kind}' (known: {', '.join(FIELDS)})")
    if cfg.builtin is not None:
        if cfg.builtin not in BUILTIN_TASKS:
            raise UserError(f"task.builtin: unknown data set '{cfg.builtin}' (known: {', '.join(BUILTIN_TASKS)})")
        records, test, val = BUILTIN_TASKS[cfg.builtin][1](cfg), None, None
    else:
        if not cfg.train_path:
            raise UserError("task.train_path: required when task.builtin is not set")
        records = load_records(cfg.train_path, cfg, "task.train_path")
        test = load_records(cfg.test_path, cfg, "task.test_path") if cfg.test_path else None
        val = load_records(cfg.val_path, cfg, "task.val_path") if cfg.val_path else None
    if test is None:
        records, test = split(records, cfg.test_fraction, cfg.seed, "test")
    train, val = split(records, cfg.val_fraction, cfg.seed, "val") if val is None else (records, val)
    for name, part in (("train", train), ("val", val), ("test", test)):
        if not part:
            raise UserError(f"task: the {name} split is empty ({len(records)} records; check task.*_fraction)")
    splits = {"train": shuffled(train, cfg.seed), "val": shuffled(val, cfg.seed), "test": shuffled(test, cfg.seed)}
    if cfg.kind == "classification":
        unseen = sorted({r["label"] for part in ("val", "test") for r in splits[part]} - {r["label"] for r in train})
        if unseen and not cfg.allow_unseen_labels:
            count = sum(r["label"] in unseen for part in ("val", "test") for r in splits[part])
            raise UserError(f"{'task.test_path' if cfg.test_path else 'task.train_path'}: label(s) {', '.join(map(repr, unseen[:5]))} occur in {count} val/test "
                            "record(s) but never in the training split, so no model can predict them; fix the files "
                            "or set task.allow_unseen_labels=true to score them as errors")
    return splits


def data_report(splits: dict[str, list[dict]], kind: str) -> tuple[dict, list[str]]:
    """What in the task data would silently mislead: test records that repeat training records (their
    accuracy is memory, not generalisation) and labels that differ only in case ('Pos', 'pos').
    Metrics (test_in_train, label_case_variants) and one warning line each."""
    def input_key(record: dict) -> str:
        return record_key({k: v for k, v in record.items() if k != "label"})

    train_keys = {input_key(r) for r in splits["train"]}
    repeated = [r for r in splits["test"] if input_key(r) in train_keys]
    metrics, warnings = {"test_in_train": len(repeated)}, []
    if repeated:
        warnings.append(f"{len(repeated)} of {len(splits['test'])} test records repeat a training input "
                        f"(e.g. {str(next(iter(repeated[0].values())))[:60]!r}); their scores measure memory")
    if kind == "classification":
        labels = sorted({r["label"] for part in splits.values() for r in part})
        by_folded = collections.defaultdict(list)
        for label in labels:
            by_folded[label.casefold()].append(label)
        variants = [group for group in by_folded.values() if len(group) > 1]
        metrics["label_case_variants"] = len(variants)
        if variants:
            warnings.append("labels that differ only in case are separate classes: " +
                            "; ".join(" / ".join(map(repr, group)) for group in variants[:5]))
    return metrics, warnings


def run(cfg: TaskConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    splits = prepare(cfg)
    for name, records in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", records)
    metrics = {f"{name}_records": len(records) for name, records in splits.items()}
    found, warnings = data_report(splits, cfg.kind)
    metrics.update(found)
    for warning in warnings:
        ctx.say(f"warning: {warning}")
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


def target_of(record: dict, kind: str) -> str:
    """The text the model learns to produce."""
    return record["messages"][-1]["content"] if kind == "chat" else record[FIELDS[kind][1]]


def render(record: dict, cfg: TaskConfig) -> tuple[str, str, str, str]:
    """Text before the input, the input, text after it, and the target of one record."""
    if cfg.kind == "chat":
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # a template from config runs no code

        template = ImmutableSandboxedEnvironment().from_string(cfg.chat_template)
        return "", template.render(messages=record["messages"][:-1], add_generation_prompt=True), "", \
            target_of(record, "chat")
    input_field, target_field = FIELDS[cfg.kind]
    head, _, tail = cfg.prompt_template.partition("{" + input_field + "}")
    return head, record[input_field], tail, " " + record[target_field]


def encode_example(tokenizer, record: dict, cfg: TaskConfig, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + target + EOS and the index where the target starts. An over-long
    input is cut (its end; for a conversation its beginning) so the template's tail and the
    whole target always fit."""
    head, body, tail, target = render(record, cfg)
    target_ids = encode_target(tokenizer, target)
    prompt_ids = encode_prompt(tokenizer, (head, body, tail), cfg.kind, max_length, len(target_ids))
    return prompt_ids + target_ids, len(prompt_ids)


def encode_target(tokenizer, target: str) -> list[int]:
    """A target's token ids (`render` gives it its leading space) and EOS."""
    return tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]


def encode_prompt(tokenizer, parts: tuple[str, str, str], kind: str, max_length: int, target_length: int) -> list[int]:
    """Token ids of a prompt from `render`'s (head, input, tail), the input cut (its end; for a
    conversation its beginning) so that the tail and a target of target_length tokens fit in max_length."""
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []
    head_ids, body_ids, tail_ids = (encode(part) for part in parts)
    room = max_length - len(head_ids) - len(tail_ids) - target_length
    if room < 1:
        raise UserError(f"finetune.max_length ({max_length}) leaves no room for the input of a record "
                        f"(template and target take {max_length - room} tokens)")
    kept = body_ids[-room:] if kind == "chat" else body_ids[:room]
    return head_ids + kept + tail_ids
