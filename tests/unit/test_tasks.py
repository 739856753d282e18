"""Pure functions of the stages: normalisation, splits, packing, batching, schedules, metrics."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conf.schema import TaskConfig, TrainConfig
from tasks import evaluate, finetune, ingest, labelscore, taskdata, tokenize, training
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


def test_headerless_csv_tsv_take_columns_by_position(tmp_path):
    (tmp_path / "h.tsv").write_text("good film\tpos\nbad film\tneg\n")
    (tmp_path / "h.csv").write_text("pos,good film\nneg,bad film\n")
    by_order = TaskConfig(header=False)
    assert taskdata.load_records(str(tmp_path / "h.tsv"), by_order, "k") == [
        {"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    mapped = TaskConfig(header=False, fields={"text": "1", "label": "0"})
    assert taskdata.load_records(str(tmp_path / "h.csv"), mapped, "k")[1] == {"text": "bad film", "label": "neg"}
    # read with a header, the first row's values become column names: the error says so and what to set
    with pytest.raises(UserError, match=r"h.tsv:2: missing field 'text' .*the header row gave the columns "
                                        r"'good film', 'pos'.*task.header=false"):
        taskdata.load_records(str(tmp_path / "h.tsv"), TaskConfig(), "k")
    with pytest.raises(UserError, match=r"missing field 'text' \(column '5'\).*2 columns, named by position \('0', '1'\)"):
        taskdata.load_records(str(tmp_path / "h.tsv"), TaskConfig(header=False, fields={"text": "5"}), "k")


def test_task_data_that_would_mislead_is_normalised_reported_or_stopped(tmp_path):
    train = [{"text": f"sentence {i}", "label": "pos " if i % 2 else "neg"} for i in range(40)] + \
        [{"text": "odd one", "label": "Pos"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    test = [{"text": "sentence 3", "label": "pos"}, {"text": "new", "label": "neg"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    cfg = TaskConfig(train_path=str(tmp_path / "train.jsonl"), test_path=str(tmp_path / "test.jsonl"))
    splits = taskdata.prepare(cfg)
    assert {r["label"] for r in splits["train"]} <= {"pos", "neg", "Pos"}  # 'pos ' is 'pos'
    metrics, warnings = taskdata.data_report(splits, "classification")
    assert metrics == {"test_in_train": 1, "label_case_variants": 1}
    assert "1 of 2 test records repeat a training input" in warnings[0] and "'Pos' / 'pos'" in warnings[1]
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "x", "label": "unknown"}) + "\n")
    with pytest.raises(UserError, match=r"^task.test_path: label\(s\) 'unknown' occur in 1 val/test record"):
        taskdata.prepare(cfg)
    allowed = dataclasses.replace(cfg, allow_unseen_labels=True)
    assert taskdata.prepare(allowed)["test"] == [{"text": "x", "label": "unknown"}]


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

    from tasks.pretrain import build_model, count_parameters, flops_per_token
    from tests.conftest import compose_config

    cfg = compose_config([f"model={size}"]).model
    with torch.device("meta"):
        model = build_model(cfg, 32000, 0, 2)
    norms = cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size
    attention_flops = 12 * cfg.num_layers * cfg.hidden_size * 128
    matmul_weights = (flops_per_token(cfg, 32000, 128) - attention_flops) / 6
    assert matmul_weights + norms == count_parameters(model)


def test_one_big_text_file_becomes_paragraph_documents():
    from tasks.sources import Part, Source

    book = "\n\n".join(f"Paragraph {i}. " + "word " * 40 for i in range(10))  # 10 paragraphs of ~215 chars
    text_part = Part(Source("file", "book.txt", 0), 0)
    docs = ingest.split_documents([("book.txt", book)], text_part, chunk_chars=500)
    assert [d for d, _ in docs] == [f"book.txt#{n}" for n in range(len(docs))] and len(docs) == 5
    assert all(len(text) <= 500 for _, text in docs)
    assert "\n\n".join(text for _, text in docs) == ingest.normalize(book)  # nothing lost, nothing repeated
    # off, or a record file: one document per file / record
    assert ingest.split_documents([("book.txt", book)], text_part, 0) == [("book.txt", ingest.normalize(book))]
    records = Part(Source("file", "rows.jsonl", 0), 0)
    assert len(ingest.split_documents([("rows.jsonl:1", book)], records, 500)) == 1
    # a line longer than the limit stays whole
    assert ingest.paragraph_chunks("x" * 900 + "\n\nshort", 500) == ["x" * 900, "short"]
    # a file of one sentence a line (no blank lines) is cut at its line breaks
    lines = "\n".join(f"sentence {i:03d} of a review file" for i in range(100))
    chunks = ingest.paragraph_chunks(lines, 300)
    assert len(chunks) > 5 and all(len(c) <= 300 for c in chunks)
    assert "\n".join(chunks) == lines


def test_class_examples_are_left_padded_with_one_label_each():
    batch = finetune.collate_classes([([5, 6, 7], 1), ([8], 0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [1, 0] and batch["weight"] == 2


def test_epoch_budget_sets_max_steps_from_the_data():
    from conf.schema import FinetuneConfig

    cfg = FinetuneConfig(max_steps=7, global_batch_size=32, max_epochs=2.5)
    assert finetune.epoch_budget(cfg, 1000).max_steps == 79  # ceil(2.5 * 1000 / 32)
    assert finetune.epoch_budget(FinetuneConfig(max_steps=7), 1000).max_steps == 7


def test_objective_and_stopping_metric_follow_the_task_kind():
    from conf.schema import FinetuneConfig

    cfg = FinetuneConfig()
    assert finetune.resolve_objective(cfg, "classification") == "classifier"
    assert finetune.resolve_objective(cfg, "generation") == "lm"
    assert finetune.stopping_metric(cfg, "classification") == "val_accuracy"
    assert finetune.stopping_metric(cfg, "chat") == "val_loss"


def test_convergence_warnings():
    from tasks.trainlog import convergence_warnings

    flat = [{"loss": 2.0}, {"loss": 1.99, "val_loss": 2.0}, {"loss": 1.98, "val_loss": 2.0}]
    assert any("plateau" in w for w in convergence_warnings(flat))
    rising = [{"loss": 2.0, "val_accuracy": 0.5}, {"loss": 1.0, "val_accuracy": 0.6}, {"loss": 0.5, "val_accuracy": 0.7}]
    assert [w for w in convergence_warnings(rising) if "still improving" in w]
    settled = [{"loss": 2.0, "val_accuracy": 0.5}, {"loss": 1.0, "val_accuracy": 0.8}, {"loss": 0.5, "val_accuracy": 0.7}]
    assert convergence_warnings(settled) == []


def test_quality_warnings_flag_a_model_that_does_not_beat_a_baseline():
    task = {"comparisons": {"tfidf_logreg": {"accuracy_delta": -0.1, "low": -0.15, "high": -0.05, "verdict": "worse"},
                            "majority": {"accuracy_delta": 0.2, "low": 0.1, "high": 0.3, "verdict": "better"}}}
    warnings = evaluate.quality_warnings(task, {"pretrained": 120.0, "ngram3": 100.0})
    assert len(warnings) == 2 and "tfidf_logreg" in warnings[0] and "n-gram" in warnings[1]


def test_contextual_calibration_removes_the_prompt_prior():
    """A model that adds the same bias to one label for every input: calibration against content-free
    inputs takes it out, length normalisation divides by the label's tokens (+EOS)."""

    class Biased(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, 10)
            logits[..., 3] = 2.0  # token 3 ("label a") is favoured everywhere
            return type("Out", (), {"logits": logits})()

    class Tok:
        pad_token_id, eos_token_id = 0, 9

        def encode(self, text, add_special_tokens=False):
            return [3] if text.strip() == "a" else [4, 5] if text.strip() == "b" else [1] * len(text.split())

    task = TaskConfig(prompt_template="{text} =")
    variants = evaluate.likelihood_variants(Biased(), Tok(), [[-1.0, -4.0], [-1.0, -4.0]], ["a", "b"], task, 32)
    assert variants["lengthnorm"][0] == [-0.5, -4.0 / 3]
    # the same scores as the content-free inputs: calibrated, both labels are equally likely
    summed = [labelscore.label_log_likelihoods(Biased(), Tok(), {"text": "x", "label": "a"}, ["a", "b"], task, 32)]
    calibrated = evaluate.likelihood_variants(Biased(), Tok(), summed, ["a", "b"], task, 32)["calibrated"][0]
    assert calibrated[0] == pytest.approx(calibrated[1])


def test_drop_hint_names_the_setting_behind_the_biggest_reason():
    assert ingest.drop_hint({"too_long": 3, "too_short": 1, "duplicate": 9}).endswith(
        "dropped as too_long: see data.filters.max_doc_chars (or cut big text files into paragraph documents "
        "with data.text_chunk_chars)")
    assert ingest.drop_hint({"duplicate": 2}) == ""


def test_packed_candidates_see_the_prompt_and_themselves_only():
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])  # prompt, candidate 1, candidate 2, padding
    allowed = labelscore.packed_attention_mask(segments, torch.float32)[0, 0] == 0
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]  # candidate 1: prompt + itself
    assert allowed[5].tolist() == [True, True, False, False, True, True, False]  # candidate 2 skips candidate 1
    assert allowed[1].tolist() == [True, True, False, False, False, False, False]  # causal within the prompt
    assert allowed[:, 6].tolist() == [False] * 6 + [True]  # no token sees padding, which sees itself (no empty row)
    # each candidate's first token is predicted at the prompt's last position, the rest at their own
    assert labelscore.scored_positions(2, [[3, 4], [3]]) == [[1, 2], [1]]
    assert labelscore.scored_positions(3, [[7], [8, 9, 10]]) == [[2], [2, 4, 5]]


def test_the_builtin_chat_task_asks_what_standard_library_functions_do():
    from tasks import stdlib_chat

    records = stdlib_chat.records()
    assert 100 < len(records) <= stdlib_chat.MAX_RECORDS and records == stdlib_chat.records()  # deterministic
    question, answer = records[0]["messages"]
    assert question["role"] == "user" and question["content"].startswith("What does ") and answer["role"] == "assistant"
    assert {"What does json.dumps() do?", "What does copy.deepcopy() do?"} <= {r["messages"][0]["content"] for r in records}
    splits = taskdata.prepare(TaskConfig(kind="chat", builtin="stdlib_chat", train_path=None))
    assert sum(map(len, splits.values())) == len(records) and all(splits.values())
    with pytest.raises(UserError, match="task.builtin: unknown data set 'nope' \\(known: stdlib_packages, stdlib_chat\\)"):
        taskdata.prepare(TaskConfig(kind="chat", builtin="nope"))
