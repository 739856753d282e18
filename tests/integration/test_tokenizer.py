"""The tokenize step's tokenizer: special tokens and chat template of a trained one, and an existing
one reused from tokenizer.path (serial map: no Ray needed)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conf.schema import DataConfig, TokenizerConfig
from pipelines import dag
from pipelines.validate import validate
from tasks import ingest, tokenize
from tasks.common import TaskContext, UserError
from tests.conftest import compose_config

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Which module has sleep?"},
            {"role": "assistant", "content": "time"}]


@pytest.fixture(scope="module")
def ingest_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    ingest.run(DataConfig(builtin=["pydoc_topics"]), {}, out, TaskContext("ingest"))
    return out


def run_tokenize(cfg: TokenizerConfig, ingest_dir, out_dir):
    out_dir.mkdir()
    metrics = tokenize.run(cfg, {"ingest": ingest_dir}, out_dir, TaskContext("tokenize"))
    return metrics, json.loads((out_dir / "meta.json").read_text())


def corpus_texts(ingest_dir) -> list[str]:
    return [text for shard in ingest.read_shards(ingest_dir) for text in pq.read_table(shard).column("text").to_pylist()]


def test_trained_tokenizer_has_chat_tokens_and_template(ingest_dir, tmp_path):
    from transformers import AutoTokenizer

    cfg = TokenizerConfig(vocab_size=600, seq_len=32, val_fraction=0.2)
    _, meta = run_tokenize(cfg, ingest_dir, tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok" / "tokenizer"))
    names = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert [hf.encode(name, add_special_tokens=False) for name in names] == [[i] for i in range(len(names))]
    assert set(names) <= set(hf.all_special_tokens) and hf.bos_token == "<|bos|>"
    assert meta["special_tokens"] == {name: i for i, name in enumerate(names)}
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["vocab_size"]) == (0, 1, 2, 600)
    assert "chat_template" in json.loads((tmp_path / "tok" / "tokenizer" / "tokenizer_config.json").read_text())

    text = hf.apply_chat_template(MESSAGES, tokenize=False)
    assert text == ("<|system|>\nAnswer briefly.<|end|>\n<|user|>\nWhich module has sleep?<|end|>\n"
                    "<|assistant|>\ntime<|end|>\n")
    ids = hf.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    assert hf.decode(ids) == text and ids.count(hf.convert_tokens_to_ids("<|end|>")) == 3
    prompt = hf.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    # the corpus's only special id is the EOS after each document
    train = np.asarray(tokenize.load_split(tmp_path / "tok", "train"))
    assert set(np.unique(train[train < len(names)])) == {2}


def test_special_tokens_in_corpus_text_stay_text(tmp_path):
    cfg = TokenizerConfig(vocab_size=300)
    tokenizer = tokenize.train_tokenizer(["plain words and more words"] * 20, cfg)
    train, _ = tokenize.encode_docs(tokenizer.to_str(), ["a <|eos|> b <|user|>"], [False], eos_id=2)
    assert list(train).count(2) == 1 and train[-1] == 2 and 4 not in train


def make_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A small BPE tokenizer as another project would make it: GPT-2's '<|endoftext|>', no pad."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def direct_rows(tokenizer: Tokenizer, texts: list[str], is_val: list[bool], eos_id: int, seq_len: int) -> dict:
    """The packed splits computed without the step: encode_batch, EOS after each document, cut into rows."""
    streams = {False: [], True: []}
    for encoding, val in zip(tokenizer.encode_batch(texts, add_special_tokens=False), is_val):
        streams[val] += encoding.ids + [eos_id]
    return {split: np.asarray(streams[val][: len(streams[val]) // seq_len * seq_len]).reshape(-1, seq_len)
            for split, val in (("train", False), ("val", True))}


def test_reused_tokenizer_is_copied_and_encodes_like_encode_batch(ingest_dir, tmp_path):
    from transformers import AutoTokenizer

    texts = corpus_texts(ingest_dir)
    source = make_tokenizer(texts[:20], vocab_size=700)
    (tmp_path / "saved").mkdir()
    source.save(str(tmp_path / "saved" / "tokenizer.json"))
    (tmp_path / "saved" / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 1024}))
    cfg = TokenizerConfig(path=str(tmp_path / "saved"), vocab_size=4096, seq_len=32, val_fraction=0.2)
    metrics, meta = run_tokenize(cfg, ingest_dir, tmp_path / "tok")

    eos_id = source.token_to_id("<|endoftext|>")
    assert meta["vocab_size"] == metrics["vocab_size"] == source.get_vocab_size() == 700
    assert (meta["eos_id"], meta["pad_id"], meta["dtype"]) == (eos_id, eos_id, "uint16")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok" / "tokenizer"))
    assert hf.eos_token == hf.pad_token == "<|endoftext|>" and len(hf) == 700
    doc_ids = [d for shard in ingest.read_shards(ingest_dir) for d in pq.read_table(shard).column("doc_id").to_pylist()]
    expected = direct_rows(source, texts, [tokenize.is_validation(d, 0.2) for d in doc_ids], eos_id, 32)
    for split in ("train", "val"):
        np.testing.assert_array_equal(tokenize.load_split(tmp_path / "tok", split), expected[split])


def test_reused_tokenizer_file_takes_missing_tokens_from_the_config(tmp_path):
    from tasks import tokenizer_files

    make_tokenizer(["some text to learn from"] * 10, vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    loaded = tokenizer_files.load(TokenizerConfig(path=str(tmp_path / "tokenizer.json"),
                                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>"))
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>" and loaded.bos_token is None
    with pytest.raises(UserError, match=r"^tokenizer.path: .* has no pad token and tokenizer.pad_token '<\|pad\|>' "
                                        r"is not in its vocabulary.*its EOS '<\|endoftext\|>' can pad\)$"):
        tokenizer_files.load(TokenizerConfig(path=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>"))


def test_reused_tokenizer_problems_stop_validation(tmp_path):
    make_tokenizer(["some text to learn from"] * 10, vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "broken.json").write_text("{not json")
    for path, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "broken.json", "cannot load"),
                          (tmp_path, "has no eos and no pad token")):
        cfg = compose_config(["+experiment=tiny", f"tokenizer.path={path}"])
        with pytest.raises(UserError, match=f"^tokenizer.path: .*{message}"):
            validate(cfg)


def test_reused_tokenizer_fingerprint_follows_its_bytes_not_its_path(tmp_path):
    make_tokenizer(["some text to learn from"] * 10, vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "tokenizer.json", tmp_path / "moved" / "tokenizer.json")

    def view(path, **settings):
        return dag.tokenize_identity(TokenizerConfig(path=str(path), **settings))

    assert view(tmp_path / "tokenizer.json") == view(tmp_path / "moved" / "tokenizer.json")
    assert view(tmp_path / "tokenizer.json") == view(tmp_path / "moved", vocab_size=123)  # training settings unused
    assert view(tmp_path / "tokenizer.json") != dag.tokenize_identity(TokenizerConfig())
    make_tokenizer(["other text entirely"] * 10, vocab_size=300).save(str(tmp_path / "moved" / "tokenizer.json"))
    assert view(tmp_path / "tokenizer.json") != view(tmp_path / "moved" / "tokenizer.json")


def test_ids_beyond_uint16_are_packed_as_uint32(tmp_path):
    vocab = {"<|eos|>": 0, "a": 1, "b": 70_000}  # a gap in the ids: the size is the largest id + 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert tokenize.vocab_size(tokenizer) == 70_001
    splits, _, _ = tokenize.encode_and_pack(tokenizer, ["a b b", "b a"], [False, True], TokenizerConfig(seq_len=2),
                                         tmp_path, TaskContext("tokenize"))
    assert splits["train"].dtype == np.uint32 and splits["train"].tolist() == [[1, 70_000], [70_000, 0]]
    assert splits["val"].tolist() == [[70_000, 1]]


def test_one_document_is_split_by_packed_rows(tmp_path):
    """A corpus of one document (a book not cut into paragraphs) still gets a validation split: a seeded
    share of the packed rows, at least one, written as val.bin."""
    tokenizer = Tokenizer(models.WordLevel({"<|eos|>": 0, "a": 1, "b": 2}, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for is_val in ([False], [True]):  # the one document on either side of the split by documents
        splits, _, split_by = tokenize.encode_and_pack(
            tokenizer, ["a b " * 20], is_val, TokenizerConfig(seq_len=4, val_fraction=0.1), tmp_path, TaskContext("tokenize"))
        assert split_by == "rows"
        assert len(splits["val"]) >= 1 and len(splits["train"]) >= 1
        assert len(splits["train"]) + len(splits["val"]) == 41 // 4
        assert (tmp_path / "val.bin").stat().st_size == splits["val"].nbytes
    with pytest.raises(UserError, match="^tokenizer.seq_len: the corpus makes 1 row"):
        tokenize.encode_and_pack(tokenizer, ["a b"], [False], TokenizerConfig(seq_len=3), tmp_path, TaskContext("tokenize"))
