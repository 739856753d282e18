"""Shared fixtures: Hydra composition of the project's config and tiny data sets."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conf.compose import CONF_DIR, compose_config  # noqa: F401  (the tests' way to compose)
from conf.schema import Config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory):
    """Corpus digests (tasks/file_digests.py) are remembered in the session's temporary directory,
    not the user's ~/.cache; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("digests") / "file-digests.sqlite"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFORGE_DIGEST_CACHE", str(path))
        yield path


@pytest.fixture
def tiny_cfg(tmp_path) -> Config:
    return compose_config(["+experiment=tiny", f"paths.root={tmp_path / 'runs'}"])


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """A few documents in every supported format, with an empty one and a duplicate."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("The first document.\r\nIt has two lines.   \n\n\n\nAnd a gap.")
    (d / "b.md").write_text("   \n  ")  # empty after normalisation
    (d / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                         ["A record in JSON lines.", "The first document.\nIt has two lines.\n\nAnd a gap.", "x"]))
    pq.write_table(pa.table({"body": ["A parquet row of text.", "Another parquet row."]}), d / "d.parquet")
    return d


@pytest.fixture(scope="session")
def single_rank():
    """What a launcher provides: a one-process gloo group (DeepSpeed joins it)."""
    import os

    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def fault_table():
    """Records one row of the fault-injection table (tests/faults/table.py prints it): the
    scenario, the fault injected, the outcome, the work redone and the data lost. A no-op unless
    $LMFORGE_FAULT_TABLE names the file to append to."""
    import os

    def record(scenario: str, fault: str, outcome: str, redone: str, lost: str) -> None:
        path = os.environ.get("LMFORGE_FAULT_TABLE")
        if path:
            row = {"scenario": scenario, "fault": fault, "outcome": outcome, "redone": redone, "lost": lost}
            with open(path, "a") as table:
                table.write(json.dumps(row) + "\n")

    return record


UPSTREAM = ("ingest", "tokenize", "pretrain")


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory) -> Path:
    """A root where the tiny experiment's ingest, tokenize and pretrain ran once (`until=pretrain`):
    end-to-end tests that check what happens downstream start from a copy (copy_upstream) instead
    of pretraining again."""
    root = tmp_path_factory.mktemp("tiny-upstream")
    done = subprocess.run([sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}",
                           "ray.num_cpus=2", "until=pretrain"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def copy_upstream(upstream: Path, root: Path) -> None:
    """The upstream steps' published directories into another root, where they are cache hits."""
    for name in UPSTREAM:
        shutil.copytree(upstream / name, root / name)


FULL_SUITE_DIRS = ("e2e", "faults")


def save_tiny_model(model_dir: Path, labels: list[str] | None = None) -> Path:
    """A random 1-layer Llama (a sequence classifier when `labels` are given) with a small trained BPE
    tokenizer, saved as the pipeline exports models: for tests of what loads exported directories."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator([f"question {i} answer {i * 7}" for i in range(40)], trainers.BpeTrainer(
        vocab_size=64 + 256, special_tokens=["<pad>", "<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = LlamaForCausalLM(config)
        model.generation_config.max_new_tokens = 8
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return model_dir


def pytest_collection_modifyitems(config, items):
    """Tests under tests/e2e and tests/faults run whole pipelines in subprocesses: marked `e2e`, left
    out of the fast tier (`-m "not e2e and not slow"`), which is what a developer runs between changes."""
    for item in items:
        if Path(item.fspath).parent.name in FULL_SUITE_DIRS:
            item.add_marker(pytest.mark.e2e)
