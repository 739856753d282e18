"""tokenize: train a byte-level BPE tokenizer, encode in parallel, pack into fixed-length arrays.

Documents are split into train/val by a hash of their id (so no document is in
both), each encoded document ends with EOS, and the token streams are packed into
`seq_len` rows stored as uint16 (uint32 for vocabularies over 65,535) that
training reads memory-mapped.

    run(cfg: TokenizerConfig, inputs={"ingest": dir}, out_dir, ctx) -> metrics
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conf.schema import TokenizerConfig
from tasks.common import TaskContext, UserError, hash_fraction, write_json
from tasks.ingest import read_shards

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
SPLIT_SEED = 0
TASKS_PER_CPU = 4  # several tasks per CPU even out documents of very different sizes


def is_validation(doc_id: str, val_fraction: float) -> bool:
    return hash_fraction(doc_id, SPLIT_SEED) < val_fraction


def train_tokenizer(texts, cfg: TokenizerConfig) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, tokenizer_dir: Path, model_max_length: int) -> None:
    """Save so that `transformers.AutoTokenizer.from_pretrained(tokenizer_dir)` loads it."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=model_max_length,
    )
    hf.save_pretrained(str(tokenizer_dir))


def load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def encode_docs(tokenizer_json: str, texts: list[str], is_val: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Encode one batch of documents (a parallel task): EOS-terminated token streams for train and val."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eos_id = tokenizer.token_to_id(EOS)
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
                    out_dir: Path, ctx: TaskContext) -> tuple[dict[str, np.ndarray], int]:
    """Encode in parallel tasks, pack and write train.bin / val.bin: the packed splits, and the number of
    tokens encoded (EOS included, before the incomplete last rows are cut)."""
    tokenizer_json = tokenizer.to_str()
    bounds = batch_bounds([len(t) for t in texts], TASKS_PER_CPU * max(ctx.num_cpus, 1), cfg.docs_per_task)
    batches = [(texts[start:end], is_val[start:end]) for start, end in bounds]
    ctx.say(f"encoding {len(texts)} documents in {len(batches)} parallel tasks")
    encoded = ctx.parallel_map(lambda batch: encode_docs(tokenizer_json, *batch), batches)
    dtype = token_dtype(tokenizer.get_vocab_size())
    splits = {}
    for index, split in enumerate(["train", "val"]):
        rows = pack(np.concatenate([e[index] for e in encoded]), cfg.seq_len, dtype)
        if len(rows) == 0:
            raise UserError(f"tokenizer.seq_len: the {split} split has fewer than {cfg.seq_len} tokens "
                            f"(raise data.max_bytes or tokenizer.val_fraction)")
        rows.tofile(out_dir / f"{split}.bin")
        splits[split] = rows
    return splits, sum(len(e[0]) + len(e[1]) for e in encoded)


def run(cfg: TokenizerConfig, inputs: dict, out_dir: Path, ctx: TaskContext) -> dict:
    doc_ids, texts = [], []
    for shard in read_shards(inputs["ingest"]):
        table = pq.read_table(shard, columns=["doc_id", "text"])
        doc_ids += table.column("doc_id").to_pylist()
        texts += table.column("text").to_pylist()
    is_val = [is_validation(d, cfg.val_fraction) for d in doc_ids]

    sample, sample_bytes = [], 0
    for text, val in zip(texts, is_val):
        if not val and sample_bytes < cfg.train_sample_bytes:
            sample.append(text)
            sample_bytes += len(text)
    ctx.say(f"training BPE (vocab {cfg.vocab_size}) on {sample_bytes / 1e6:.1f} MB of {len(texts)} documents")
    tokenizer = train_tokenizer(sample, cfg)
    save_tokenizer(tokenizer, out_dir / "tokenizer", cfg.seq_len)
    splits, num_tokens = encode_and_pack(tokenizer, texts, is_val, cfg, out_dir, ctx)
    meta = {"dtype": splits["train"].dtype.name, "seq_len": cfg.seq_len, "vocab_size": tokenizer.get_vocab_size(),
            "eos_id": tokenizer.token_to_id(EOS), "pad_id": tokenizer.token_to_id(PAD),
            "train_rows": len(splits["train"]), "val_rows": len(splits["val"])}
    write_json(out_dir / "meta.json", meta)
    metrics = {"vocab_size": meta["vocab_size"], "train_tokens": int(splits["train"].size),
               "val_tokens": int(splits["val"].size), "train_docs": is_val.count(False), "val_docs": is_val.count(True)}
    metrics["chars_per_token"] = round(sum(map(len, texts)) / max(num_tokens, 1), 3)
    ctx.say(f"{metrics['train_tokens']:,} train / {metrics['val_tokens']:,} val tokens in rows of {cfg.seq_len}, "
            f"{metrics['chars_per_token']} chars/token")
    return metrics
