"""Pure functions of the stages: normalisation, splits, packing, batching, schedules, metrics."""
from __future__ import annotations

import numpy as np
import pytest

from conf.schema import TaskConfig, TrainConfig
from tasks import evaluate, finetune, ingest, taskdata, tokenize, training
from tasks.common import UserError


def test_normalize_keeps_indentation_and_collapses_noise():
    raw = "def f():\r\n    return 1   \n\n\n\n\x00x = 2\t\n"
    assert ingest.normalize(raw) == "def f():\n    return 1\n\nx = 2"


def test_sample_is_deterministic_and_bounded():
    sources = [ingest.Source("file", f"/f{i}", 100) for i in range(50)]
    first = ingest.sample_sources(sources, 1000, seed=1)
    assert first == ingest.sample_sources(list(reversed(sources)), 1000, seed=1)
    assert 1000 <= sum(s.size for s in first) < 1100
    assert first != ingest.sample_sources(sources, 1000, seed=2)


def test_validation_split_depends_on_document_only():
    ids = [f"doc{i}" for i in range(2000)]
    val = [d for d in ids if tokenize.is_validation(d, 0.1)]
    assert 150 < len(val) < 250
    assert val == [d for d in reversed(ids) if tokenize.is_validation(d, 0.1)][::-1]


def test_pack_drops_only_the_tail_and_picks_the_dtype():
    rows = tokenize.pack(np.arange(10, dtype=np.uint32), 4, np.uint16)
    assert rows.dtype == np.uint16 and rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tokenize.token_dtype(65536) == np.uint16 and tokenize.token_dtype(65537) == np.uint32


def test_data_order_does_not_depend_on_the_number_of_workers():
    cfg = TrainConfig(micro_batch_size=2, global_batch_size=8)

    def global_batch(step, world):
        accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
        return sorted(int(r) for micro in range(accum) for rank in range(world)
                      for r in training.sample_rows(step, micro, rank, world, cfg, 20))

    for step in range(6):  # crosses epoch boundaries (20 rows, 8 per step)
        assert global_batch(step, 1) == global_batch(step, 2) == global_batch(step, 4)
    two_epochs = [r for step in range(5) for r in global_batch(step, 1)]  # 40 rows
    assert sorted(two_epochs) == sorted(list(range(20)) * 2)
    assert len(set(global_batch(0, 1) + global_batch(1, 1))) == 16


def test_eval_slices_are_equal_per_rank_and_disjoint():
    cfg = TrainConfig(micro_batch_size=3, eval_batches=3)
    slices = [np.concatenate(training.eval_row_slices(100, cfg, rank, 2)) for rank in range(2)]
    assert len(slices[0]) == len(slices[1]) and not set(slices[0]) & set(slices[1])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    factors = [training.lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert training.lr_factor(100, cfg) == pytest.approx(0.1)


def test_deepspeed_config_is_generated_from_the_typed_config():
    cfg = TrainConfig(zero_stage=3, micro_batch_size=2, global_batch_size=8, grad_clip=0.5)
    ds = training.deepspeed_config(cfg, world=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.5


class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one token per character."""

    eos_token_id, pad_token_id = 1, 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) + 2 for c in text]


def test_encode_example_cuts_the_input_but_keeps_template_and_target():
    cfg = TaskConfig(prompt_template="<{text}>")
    ids, start = taskdata.encode_example(CharTokenizer(), {"text": "abcdefgh", "label": "xy"}, cfg, max_length=8)
    assert len(ids) == 8
    assert ids[:start] == CharTokenizer().encode("<ab>") and ids[start:] == CharTokenizer().encode(" xy") + [1]
    with pytest.raises(UserError, match="finetune.max_length"):
        taskdata.encode_example(CharTokenizer(), {"text": "abc", "label": "xyzxyz"}, cfg, max_length=6)


def test_collate_puts_loss_on_targets_only():
    batch = finetune.collate([([5, 6, 7], 2), ([5, 6, 7, 8, 9], 3)], pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, 7, -100, -100], [-100, -100, -100, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["weight"] == 3


def test_load_records_reports_file_and_line(tmp_path):
    gen = TaskConfig(kind="generation")
    path = tmp_path / "gen.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n\n{"prompt": "p", "completion": 3}\n')
    with pytest.raises(UserError, match=r"gen.jsonl:3: field 'completion' must be a non-empty string"):
        taskdata.load_records(str(path), gen, "task.train_path")
    path.write_text('{"prompt": "p", "completion": "c"}\nnot json\n')
    with pytest.raises(UserError, match=r"gen.jsonl:2: invalid JSON"):
        taskdata.load_records(str(path), gen, "task.train_path")
    with pytest.raises(UserError, match=r"task.val_path: no such file"):
        taskdata.load_records(str(tmp_path / "missing.csv"), gen, "task.val_path")


def test_csv_tsv_parquet_and_uri_with_a_field_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = TaskConfig(kind="classification", fields={"text": "sentence", "label": "category"})
    (tmp_path / "a.csv").write_text('sentence,category\n"hello, world",greet\n"bye\nnow",part\n')
    (tmp_path / "a.tsv").write_text("sentence\tcategory\nhello\tgreet\n")
    pq.write_table(pa.table({"sentence": ["hello", "bye"], "category": [1, 0]}), tmp_path / "a.parquet")
    expected = [{"text": "hello, world", "label": "greet"}, {"text": "bye\nnow", "label": "part"}]
    assert taskdata.load_records(str(tmp_path / "a.csv"), cfg, "k") == expected
    assert taskdata.load_records(f"file://{tmp_path}/a.csv", cfg, "k") == expected
    assert taskdata.load_records(str(tmp_path / "a.tsv"), cfg, "k") == [{"text": "hello", "label": "greet"}]
    assert taskdata.load_records(str(tmp_path / "a.parquet"), cfg, "k")[0] == {"text": "hello", "label": "1"}
    (tmp_path / "b.csv").write_text("sentence,cat\nhello,greet\n")
    with pytest.raises(UserError, match=r"b.csv:2: missing field 'label' \(column 'category'\)"):
        taskdata.load_records(str(tmp_path / "b.csv"), cfg, "k")
    pq.write_table(pa.table({"sentence": ["x", ""], "category": ["a", "b"]}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match=r"b.parquet: row 2: field 'text' \(column 'sentence'\) must be"):
        taskdata.load_records(str(tmp_path / "b.parquet"), cfg, "k")


def test_chat_records_are_checked_rendered_and_cut_from_the_start(tmp_path):
    import json

    cfg = TaskConfig(kind="chat")
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": good["messages"][:2]}) + "\n")
    with pytest.raises(UserError, match=r"chat.jsonl:2: the last message must be the assistant's"):
        taskdata.load_records(str(path), cfg, "task.train_path")
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"chat.jsonl:1: messages\[0\] needs a role"):
        taskdata.load_records(str(path), cfg, "task.train_path")

    head, body, tail, target = taskdata.render(good, cfg)
    assert body == "<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\n" and target == "Hello."

    class CharTokenizer:
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    ids, start = taskdata.encode_example(CharTokenizer(), good, cfg, max_length=20)
    assert len(ids) == 20 and "".join(map(chr, ids[start:-1])) == "Hello."
    prompt = "".join(map(chr, ids[:start]))
    assert len(prompt) < len(body) and body.endswith(prompt)  # the start of the conversation is cut


def test_stdlib_task_has_real_balanced_labels():
    records = taskdata.stdlib_function_records(TaskConfig().stdlib, seed=0)
    counts = {}
    for r in records:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
        assert r["text"].lstrip().startswith(("def ", "async def ", "@"))
    assert set(counts) == set(TaskConfig().stdlib.packages) and set(counts.values()) == {300}


def test_seeded_split_is_disjoint_and_stable():
    records = [{"text": f"t{i}", "label": "a"} for i in range(500)]
    rest, held = taskdata.split(records, 0.2, seed=0, salt="test")
    assert len(rest) + len(held) == 500 and 70 < len(held) < 130
    assert taskdata.split(records[::-1], 0.2, seed=0, salt="test")[1] == held[::-1]
    assert taskdata.shuffled(records, 0) == taskdata.shuffled(records[::-1], 0) != records


def test_classification_scores():
    scores = evaluate.classification_scores(["a", "a", "b", "c"], ["a", "b", "b", "a"], ["a", "b", "c"])
    assert scores["accuracy"] == 0.5
    assert scores["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)


def test_unigram_baseline_uses_the_model_targets():
    train = np.array([[1, 1, 2, 2]])
    val = np.array([[0, 1, 2, 1]])
    counts = np.array([1, 3, 3])  # add-one smoothing over a vocabulary of 3
    expected = -np.mean(np.log(counts[[1, 2, 1]] / counts.sum()))
    assert evaluate.unigram_nll(train, val, 3) == pytest.approx(expected)


@pytest.mark.parametrize("size", ["tiny", "small", "25m", "125m", "350m", "1b"])
def test_model_sizes_and_flops_per_token_agree_with_the_model(size):
    """Every matrix-multiply weight is counted once in FLOPs per token (the tied head included)."""
    import torch

    from tasks.pretrain import build_model, count_parameters, flops_per_token
    from tests.conftest import compose_config

    cfg = compose_config([f"model={size}"]).model
    with torch.device("meta"):
        model = build_model(cfg, 32000, 0, 2)
    norms = cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size
    attention_flops = 12 * cfg.num_layers * cfg.hidden_size * 128
    matmul_weights = (flops_per_token(cfg, 32000, 128) - attention_flops) / 6
    assert matmul_weights + norms == count_parameters(model)
