"""tokenize: train a byte-level BPE tokenizer (or reuse one), encode in parallel, pack into fixed-length arrays.

The tokenizer is trained on a sample of the training split (`tokenizer.train_sample_bytes`) with
the special tokens of the config at ids 0.. (pad, bos, eos, then the chat format's role and
end-of-turn tags) and saved with the config's chat template, or it is an existing one from
`tokenizer.path` (tasks/tokenizer_files.py), saved again as it is with its special tokens resolved.
Either way `tokenizer/` loads with `AutoTokenizer` and `meta.json` has the real vocabulary size
and the special token ids. Special tokens written in the corpus text are encoded as plain text,
so the only control id in the packed arrays is the EOS after each document.

Documents are split into train/val by a hash of their id (so no document is in
both), each encoded document ends with EOS, and the token streams are packed into
`seq_len` rows stored as uint16 (uint32 for vocabularies over 65,535) that
training reads memory-mapped.

    run(cfg: TokenizerConfig, inputs={"ingest": dir}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conf.schema import TokenizerConfig
from tasks import tokenizer_files
from tasks.common import Progress, TaskContext, UserError, hash_fraction, write_json
from tasks.ingest import read_shards

SPLIT_SEED = 0
FEW_DOCUMENTS = 20
"""Below this many documents, a split by whole documents that leaves one side without a full row is
made by packed rows instead (split_rows); above it, that means tokenizer.val_fraction is too small."""
TASKS_PER_CPU = 4  # several tasks per CPU even out documents of very different sizes
# Settings of a trained tokenizer that a reused one (tokenizer.path) ignores
TRAINING_FIELDS = ("vocab_size", "min_frequency", "train_sample_bytes", "additional_special_tokens", "chat_template")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    return hash_fraction(doc_id, SPLIT_SEED) < val_fraction


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    """A trained tokenizer's special tokens in id order, from 0 (a token named twice, e.g. eos as pad, once)."""
    return list(dict.fromkeys([cfg.pad_token, cfg.bos_token, cfg.eos_token, *cfg.additional_special_tokens]))


def train_tokenizer(texts, cfg: TokenizerConfig) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=special_tokens(cfg),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_trained(tokenizer: Tokenizer, cfg: TokenizerConfig):
    """The trained tokenizer as a transformers tokenizer that knows its special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=cfg.bos_token, eos_token=cfg.eos_token, pad_token=cfg.pad_token,
        additional_special_tokens=list(cfg.additional_special_tokens), chat_template=cfg.chat_template or None,
        model_max_length=cfg.seq_len,
    )


def train_on_sample(texts: list[str], is_val: list[bool], cfg: TokenizerConfig, ctx: TaskContext):
    """Train on the first train_sample_bytes of the training split's documents (of all documents when
    every one fell in the validation split: the split is then made by rows, split_rows)."""
    sample, sample_bytes = [], 0
    use_all = all(is_val)
    for text, val in zip(texts, is_val):
        if (use_all or not val) and sample_bytes < cfg.train_sample_bytes:
            sample.append(text)
            sample_bytes += len(text)
    ctx.say(f"training BPE (vocab {cfg.vocab_size}) on {sample_bytes / 1e6:.1f} MB of {len(texts)} documents")
    return wrap_trained(train_tokenizer(sample, cfg), cfg)


def save_tokenizer(hf_tokenizer, tokenizer_dir: Path) -> None:
    """Save so that `transformers.AutoTokenizer.from_pretrained(tokenizer_dir)` loads it; the chat
    template goes into tokenizer_config.json, where transformers 4.x looks for it too."""
    hf_tokenizer.save_pretrained(str(tokenizer_dir), save_jinja_files=False)


def vocab_size(tokenizer: Tokenizer) -> int:
    """Embedding rows the ids need: the largest id + 1 (a reused tokenizer's ids may have gaps)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_meta(hf_tokenizer) -> dict:
    """The tokenizer's part of meta.json: real vocabulary size and special token ids."""
    return {"vocab_size": vocab_size(hf_tokenizer.backend_tokenizer), "eos_id": hf_tokenizer.eos_token_id,
            "pad_id": hf_tokenizer.pad_token_id, "bos_id": hf_tokenizer.bos_token_id,
            "special_tokens": {token: hf_tokenizer.convert_tokens_to_ids(token)
                               for token in hf_tokenizer.all_special_tokens}}


def load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def encode_docs(tokenizer_json: str, texts: list[str], is_val: list[bool],
                eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode one batch of documents (a parallel task): EOS-terminated token streams for train and val.
    Special tokens written in a document are text here: a corpus cannot inject control ids. Whole
    documents: a reused tokenizer.json may carry truncation or padding settings."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True
    tokenizer.no_truncation()
    tokenizer.no_padding()
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    streams: dict[bool, list[int]] = {False: [], True: []}
    for encoding, val in zip(encodings, is_val):
        streams[val].extend(encoding.ids)
        streams[val].append(eos_id)
    return np.asarray(streams[False], dtype=np.uint32), np.asarray(streams[True], dtype=np.uint32)


def pack(stream: np.ndarray, seq_len: int, dtype) -> np.ndarray:
    """Cut a token stream into full rows of seq_len (the incomplete tail row is dropped)."""
    num_rows = len(stream) // seq_len
    return stream[: num_rows * seq_len].astype(dtype).reshape(num_rows, seq_len)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def load_split(tokenize_dir: Path, split: str) -> np.ndarray:
    """The packed (num_rows, seq_len) array of a split, memory-mapped."""
    import json

    meta = json.loads((tokenize_dir / "meta.json").read_text())
    return np.memmap(tokenize_dir / f"{split}.bin", dtype=meta["dtype"], mode="r").reshape(-1, meta["seq_len"])


def batch_bounds(lengths: list[int], num_batches: int, max_docs: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive batches of about equal characters (documents differ in size by
    orders of magnitude), about num_batches of them, none over max_docs documents."""
    target = max(sum(lengths) / max(num_batches, 1), 1)
    bounds, start, size = [], 0, 0
    for index, length in enumerate(lengths):
        size += length
        if size >= target or index + 1 - start >= max_docs:
            bounds.append((start, index + 1))
            start, size = index + 1, 0
    return bounds + ([(start, len(lengths))] if start < len(lengths) else [])


def encode_and_pack(tokenizer: Tokenizer, texts: list[str], is_val: list[bool], cfg: TokenizerConfig,
                    out_dir: Path, ctx: TaskContext) -> tuple[dict[str, np.ndarray], int, str]:
    """Encode in parallel tasks, pack and write train.bin / val.bin: the packed splits, the number of
    tokens encoded (EOS included, before the incomplete last rows are cut), and how the validation
    split was made: 'documents' (whole documents by hash) or 'rows' (split_rows)."""
    tokenizer_json = tokenizer.to_str()
    bounds = batch_bounds([len(t) for t in texts], TASKS_PER_CPU * max(ctx.num_cpus, 1), cfg.docs_per_task)
    batches = [(texts[start:end], is_val[start:end]) for start, end in bounds]
    ctx.say(f"encoding {len(texts)} documents in {len(batches)} parallel tasks")
    eos_id = tokenizer.token_to_id(cfg.eos_token)
    progress = Progress(ctx, len(batches), "encode tasks")
    encoded = ctx.parallel_map(lambda batch: encode_docs(tokenizer_json, *batch, eos_id), batches,
                               on_result=lambda _, done: progress.update(1, tokens=len(done[0]) + len(done[1])))
    dtype = token_dtype(vocab_size(tokenizer))
    splits = {split: pack(np.concatenate([e[index] for e in encoded]), cfg.seq_len, dtype)
              for index, split in enumerate(["train", "val"])}
    split_by = "documents"
    if min(len(rows) for rows in splits.values()) == 0 and len(texts) < FEW_DOCUMENTS:
        split_by = "rows"
        splits = split_rows(np.concatenate([e[i] for e in encoded for i in (0, 1)]), cfg, dtype, len(texts), ctx)
    for split, rows in splits.items():
        if len(rows) == 0:
            hint = ("raise tokenizer.val_fraction, or cut big text files into more documents with "
                    "data.text_chunk_chars") if split == "val" else \
                   "add corpus (data.paths, data.max_bytes) or lower tokenizer.seq_len"
            raise UserError(f"tokenizer.seq_len: the {split} split has fewer than {cfg.seq_len} tokens ({hint})")
    for split, rows in splits.items():
        rows.tofile(out_dir / f"{split}.bin")
    return splits, sum(len(e[0]) + len(e[1]) for e in encoded), split_by


def split_rows(stream: np.ndarray, cfg: TokenizerConfig, dtype, num_docs: int,
               ctx: TaskContext) -> dict[str, np.ndarray]:
    """The fallback when whole documents leave a split without a full row (one book, a few files): the
    corpus is packed as one stream and a seeded tokenizer.val_fraction share of its rows is held out
    (at least one), so a one-file corpus has a validation split. The tokenizer was then trained on
    the text of the validation rows too."""
    rows = pack(stream, cfg.seq_len, dtype)
    if len(rows) < 2:
        raise UserError(f"tokenizer.seq_len: the corpus makes {len(rows)} row(s) of {cfg.seq_len} tokens, too few "
                        "for a train and a validation split (add corpus: data.paths, data.max_bytes; or lower "
                        "tokenizer.seq_len)")
    is_val = np.array([hash_fraction(f"row:{i}", SPLIT_SEED) < cfg.val_fraction for i in range(len(rows))])
    if not is_val.any() or is_val.all():
        is_val[:] = False
        is_val[-1] = True
    ctx.say(f"the {num_docs} document(s) are too few for a validation split by whole documents: held out "
            f"{int(is_val.sum())} of {len(rows)} packed rows instead (tokenizer.val_fraction={cfg.val_fraction}; "
            "data.text_chunk_chars cuts text files into documents)")
    return {"train": rows[~is_val], "val": rows[is_val]}


def read_corpus(inputs: dict, ctx: TaskContext) -> tuple[list[str], list[str], int]:
    """Doc ids and texts of the ingest shards, less the documents the decontaminate step found
    overlapping the task's sets when it is an input (decontaminate.remove); and how many were left out."""
    from tasks.decontaminate import contaminated_docs

    doc_ids, texts = [], []
    for shard in read_shards(inputs["ingest"]):
        table = pq.read_table(shard, columns=["doc_id", "text"])
        doc_ids += table.column("doc_id").to_pylist()
        texts += table.column("text").to_pylist()
    if "decontaminate" not in inputs:
        return doc_ids, texts, 0
    removed = contaminated_docs(inputs["decontaminate"])
    kept = [i for i, doc_id in enumerate(doc_ids) if doc_id not in removed]
    ctx.say(f"left out {len(doc_ids) - len(kept)} corpus documents that overlap the task's sets (decontaminate.remove)")
    return [doc_ids[i] for i in kept], [texts[i] for i in kept], len(doc_ids) - len(kept)


def run(cfg: TokenizerConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    doc_ids, texts, num_removed = read_corpus(inputs, ctx)
    is_val = [is_validation(d, cfg.val_fraction) for d in doc_ids]
    if cfg.path:
        hf_tokenizer = tokenizer_files.load(cfg)
        ctx.say(f"reusing the tokenizer at {cfg.path} (vocabulary {len(hf_tokenizer):,})")
        cfg = dataclasses.replace(cfg, eos_token=hf_tokenizer.eos_token)  # its own EOS ends the documents
    else:
        hf_tokenizer = train_on_sample(texts, is_val, cfg, ctx)
    save_tokenizer(hf_tokenizer, out_dir / "tokenizer")
    splits, num_tokens, split_by = encode_and_pack(hf_tokenizer.backend_tokenizer, texts, is_val, cfg, out_dir, ctx)
    meta = {"dtype": splits["train"].dtype.name, "seq_len": cfg.seq_len, **tokenizer_meta(hf_tokenizer),
            "train_rows": len(splits["train"]), "val_rows": len(splits["val"]), "val_split": split_by}
    write_json(out_dir / "meta.json", meta)
    metrics = {"vocab_size": meta["vocab_size"], "train_tokens": int(splits["train"].size),
               "val_tokens": int(splits["val"].size), "train_docs": is_val.count(False), "val_docs": is_val.count(True),
               "val_split_by_rows": int(split_by == "rows")}
    if "decontaminate" in inputs:
        metrics["docs_removed_contaminated"] = num_removed
    metrics["chars_per_token"] = round(sum(map(len, texts)) / max(num_tokens, 1), 3)
    ctx.say(f"{metrics['train_tokens']:,} train / {metrics['val_tokens']:,} val tokens in rows of {cfg.seq_len}, "
            f"{metrics['chars_per_token']} chars/token")
    return metrics
