"""Pure parts of the optimisation and robustness techniques (issue 8): augmentation and perturbations,
FGM and label smoothing on a tiny Llama built in memory, ensembles, int8 quantisation and pruning,
config checks and the ensemble step's place in the plan."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conf.schema import AugmentConfig, EnsembleStepConfig, EvalConfig, FinetuneConfig, TaskConfig
from pipelines import dag
from pipelines.validate import validate
from tasks import augment, ensemble, quantize, regularize
from tasks.common import TaskContext, UserError, write_json, write_jsonl
from tests.conftest import compose_config

RECORDS = [{"text": f"def read_{i}(path):\n    return open(path).read() + value_{i % 3}", "label": f"l{i % 2}"}
           for i in range(20)]


def tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def test_augmentation_is_seeded_counted_and_keeps_labels():
    cfg = AugmentConfig(copies=2, p_delete=0.2, p_swap=0.2, p_insert=0.2, p_synonym=0.5, seed=3)
    out = augment.augment_records(RECORDS, cfg, "classification")
    assert len(out) == len(RECORDS) * 3 and out[: len(RECORDS)] == RECORDS
    assert [r["label"] for r in out[len(RECORDS):]] == [r["label"] for r in RECORDS for _ in range(2)]
    assert out == augment.augment_records(RECORDS, cfg, "classification")  # deterministic
    assert sum(a != b for a, b in zip(out, augment.augment_records(RECORDS, AugmentConfig(copies=2, seed=4), "classification"))) > 0
    assert any(r["text"] != RECORDS[i // 2]["text"] for i, r in enumerate(out[len(RECORDS):]))
    assert augment.augment_records(RECORDS, AugmentConfig(copies=0), "classification") is RECORDS


def test_lexicon_from_the_corpus_and_from_a_file(tmp_path):
    texts = ["a x b", "a y b", "c x d", "c y d", "e z f"]
    assert augment.build_lexicon(texts) == {"x": ["y"], "y": ["x"]}
    (tmp_path / "lex.json").write_text(json.dumps({"open": ["read"]}))
    assert augment.load_lexicon(AugmentConfig(lexicon_path=str(tmp_path / "lex.json")), []) == {"open": ["read"]}
    rng = augment.record_rng(0, {"text": "open"}, "t")
    assert augment.augment_text("open", AugmentConfig(p_synonym=1, p_delete=0, p_swap=0, p_insert=0),
                                {"open": ["read"]}, rng) == "read"


@pytest.mark.parametrize("name", sorted(augment.PERTURBATIONS))
def test_perturbations_change_inputs_deterministically(name):
    out = augment.perturb_records(RECORDS, name, 0.5, 0, "classification")
    assert out == augment.perturb_records(RECORDS, name, 0.5, 0, "classification")
    assert [r["label"] for r in out] == [r["label"] for r in RECORDS]
    changed = [(a["text"], b["text"]) for a, b in zip(RECORDS, out) if a["text"] != b["text"]]
    assert len(changed) > len(RECORDS) // 2
    same = {"deleted_words": lambda a, b: len(b.split()) < len(a.split()),
            "casing": lambda a, b: a.lower() == b.lower(),
            "typos": lambda a, b: len(a) == len(b) and a.lower() != b.lower()}[name]
    assert all(same(a, b) for a, b in changed)


def test_fgm_changes_gradients_and_epsilon_zero_does_not():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def grads(epsilon: float) -> list[torch.Tensor]:
        model.zero_grad()
        regularize.make_forward(model, FinetuneConfig(adversarial_epsilon=epsilon))(batch).backward()
        return [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    model(**batch).loss.backward()
    clean = [p.grad.clone() for p in model.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(0.0), clean))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(1e-9), clean))  # the FGM path itself
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(grads(1.0), clean))


def test_label_smoothing_only_while_training():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    labels = ids.clone()
    labels[:, :5] = regularize.IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    plain = model(**batch).loss
    smoothed = regularize.make_forward(model, FinetuneConfig(label_smoothing=0.2))
    assert regularize.target_loss(model(input_ids=ids).logits, labels, 0.0).item() == pytest.approx(plain.item(), rel=1e-5)
    assert smoothed(batch).item() != pytest.approx(plain.item(), rel=1e-3)
    with torch.no_grad():
        assert smoothed(batch).item() == pytest.approx(plain.item(), rel=1e-5)  # validation loss stays comparable


def test_hidden_dropout_acts_in_training_mode_only():
    model = tiny_llama()
    assert regularize.add_hidden_dropout(model, 0.5) == 2
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_ensemble_averages_member_probabilities(tmp_path):
    labels = ["a", "b", "c"]
    taskdata = tmp_path / "taskdata"
    taskdata.mkdir()
    write_json(taskdata / "labels.json", labels)
    write_jsonl(taskdata / "test.jsonl", [{"text": "apple", "label": "a"}, {"text": "cherry", "label": "c"}])
    write_jsonl(taskdata / "train.jsonl", [{"text": t, "label": label} for t, label in
                                           [("apple", "a"), ("apple pie", "a"), ("cherry", "c"), ("banana", "b")]])
    scores = {"one": [[0.0, -1.0, -2.0], [-3.0, -0.1, -1.0]], "two": [[-1.0, -0.8, -9.0], [-5.0, -4.0, -0.2]]}
    dirs = {}
    for name, member in scores.items():
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        write_json(dirs[name] / "label_scores.json", {"labels": labels, "scores": member})
    cfg = EnsembleStepConfig(EvalConfig(max_examples=2), TaskConfig(), {n: str(d) for n, d in dirs.items()})
    (tmp_path / "out").mkdir()
    metrics = ensemble.run(cfg, {"taskdata": taskdata}, tmp_path / "out", TaskContext("ensemble"))
    expected = (ensemble.label_probabilities(scores["one"]) + ensemble.label_probabilities(scores["two"])) / 2
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert np.allclose(report["ensemble_probabilities"], expected)
    assert np.allclose(np.asarray(report["ensemble_probabilities"]).sum(axis=1), 1)
    assert metrics["one_accuracy"] == 0.5 and metrics["two_accuracy"] == 0.5 and metrics["ensemble_accuracy"] == 1.0
    # beside the classic baselines, each with an interval, and the ensemble's paired differences with them
    assert metrics["majority_accuracy"] == 0.5 and metrics["tfidf_logreg_accuracy"] == 1.0
    assert metrics["ensemble_accuracy_low"] == metrics["ensemble_accuracy_high"] == 1.0
    assert metrics["one_accuracy_low"] == 0.0 and metrics["one_accuracy_high"] == 1.0
    assert report["comparisons"]["tfidf_logreg"] == {"accuracy_delta": 0.0, "low": 0.0, "high": 0.0, "verdict": "tie"}
    assert report["comparisons"]["majority"]["accuracy_delta"] == 0.5
    assert metrics["ensemble_vs_majority_delta"] == 0.5 and metrics["ensemble_vs_tfidf_logreg_high"] == 0.0


def test_generation_ensemble_decodes_on_mean_token_log_probabilities():
    """Members that agree decode exactly as `generate` does; two different members follow the argmax
    of their mean log-probabilities at every step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.evaluate import generate

    class Ids:  # what `generate` needs of a tokenizer
        pad_token_id, eos_token_id = 0, 1

    one = tiny_llama(tie=False)
    torch.manual_seed(1)
    two = LlamaForCausalLM(LlamaConfig(**{**one.config.to_dict(), "architectures": None})).eval()
    prompt = [5, 9, 17, 3]
    alone = generate(one, Ids, prompt, 6)
    assert ensemble.ensemble_generate([one, one], prompt, 6, eos_id=1) == alone
    both = ensemble.ensemble_generate([one, two], prompt, 6, eos_id=-1)
    ids = list(prompt)
    with torch.no_grad():
        for token in both:
            step = [torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0, -1], -1) for m in (one, two)]
            assert token == int((step[0] + step[1]).argmax())
            ids.append(token)
    assert len(set(both)) > 1 and both not in (alone, ensemble.ensemble_generate([two, two], prompt, 6, eos_id=-1))


def test_generation_ensemble_step_loads_its_members_and_reports_beside_them(tmp_path):
    """The ensemble step on a generation task: two fully fine-tuned members on disk (as finetune
    writes them), their evaluate reports, and the ensemble scored with exact match and chrF."""
    from sacrebleu.metrics import CHRF
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [f"question {i} answer {i * 7}" for i in range(40)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=64 + 256, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    pretrain = tmp_path / "pretrain"
    tokenizer.save_pretrained(str(pretrain / "model"))
    dirs, member_inputs = {}, {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64)
                         ).save_pretrained(str(tmp_path / f"finetune_{name}" / "model"))
        dirs[name] = tmp_path / f"evaluate_{name}"
        dirs[name].mkdir()
        write_json(dirs[name] / "report.json", {"task": {"scores": {"finetuned": {"exact_match": 0.0, "chrf": float(seed)}}}})
        member_inputs[name] = {"pretrain": str(pretrain), "finetune": str(tmp_path / f"finetune_{name}")}
    taskdata = tmp_path / "taskdata"
    taskdata.mkdir()
    test = [{"prompt": f"question {i}", "completion": f"answer {i * 7}"} for i in range(3)]
    write_jsonl(taskdata / "test.jsonl", test)
    task = TaskConfig(kind="generation", prompt_template="{prompt} ->")
    cfg = EnsembleStepConfig(EvalConfig(max_examples=2, max_new_tokens=3), task, {n: str(d) for n, d in dirs.items()},
                             member_inputs, max_length=32)
    (tmp_path / "out").mkdir()
    metrics = ensemble.run(cfg, {"taskdata": taskdata}, tmp_path / "out", TaskContext("ensemble"))
    assert metrics["a_chrf"] == 0.0 and metrics["b_chrf"] == 1.0  # the members' own scores, from their reports
    assert metrics["ensemble_exact_match"] == 0.0  # untrained members answer nonsense
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["members"] == ["a", "b"] and len(report["examples"]) == 2
    # With the first answer made the ensemble's own (the prompts, so the decoding, are unchanged):
    # exact match 1/2, and chrF is what sacrebleu gives those outputs against those answers.
    outputs = [example["ensemble"] for example in report["examples"]]
    test[0]["completion"] = outputs[0]
    write_jsonl(taskdata / "test.jsonl", test)
    metrics = ensemble.run(cfg, {"taskdata": taskdata}, tmp_path / "out", TaskContext("ensemble"))
    expected = CHRF().corpus_score(outputs, [[r["completion"] for r in test[:2]]]).score
    assert 0 < expected < 100 and metrics["ensemble_chrf"] == pytest.approx(expected)
    assert metrics["ensemble_exact_match"] == 0.5


def test_int8_model_is_smaller_reloads_weights_only_and_pruning_zeroes_weights(tmp_path):
    model = tiny_llama()
    quantize.prune_magnitude(model, 0.5)
    layers = quantize.linear_layers(model)
    assert "lm_head" not in layers and len(layers) == 14
    assert all((layer.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02) for layer in layers.values())
    int8 = quantize.quantize(model)
    reloaded = quantize.save_and_reload(int8, tiny_llama(), tmp_path / "q")
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(int8(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        assert torch.allclose(int8(input_ids=ids).logits, model(input_ids=ids).logits, atol=0.05)
    assert (tmp_path / "q" / quantize.INT8_FILE).stat().st_size < quantize.state_dict_bytes(model, tmp_path / "f.pt")
    speeds = quantize.tokens_per_second({"float": model, "int8": reloaded}, np.zeros((2, 8)), rounds=1)
    assert set(speeds) == {"float", "int8"} and min(speeds.values()) > 0


@pytest.mark.parametrize("override,key", [
    ("finetune.early_stopping.metric=bleu", "finetune.early_stopping.metric"),
    ("finetune.hidden_dropout=1.0", "finetune.hidden_dropout"),
    ("finetune.augment.p_swap=1.5", "finetune.augment.p_swap"),
    ("finetune.augment.copies=1000", "finetune.augment.copies"),
    ("eval.quantize.sparsity=1.0", "eval.quantize.sparsity"),
    ("eval.robustness.perturbations=[emoji]", "eval.robustness.perturbations"),
    ("eval.ensemble=[lora]", "eval.ensemble"),
    ("eval.ensemble=[lora,prefix]", "eval.ensemble"),
])
def test_technique_settings_name_the_key(override, key):
    cfg = compose_config(["+experiment=tiny_compare" if key == "eval.ensemble" else "+experiment=tiny", override])
    with pytest.raises(UserError, match=f"^{key}"):
        validate(cfg)


def test_ensemble_step_reads_its_members_and_does_not_change_their_fingerprints(tmp_path):
    cfg = compose_config(["+experiment=tiny_techniques", f"paths.root={tmp_path}"])
    planned = {p.step.name: p for p in dag.plan(cfg, tmp_path)}
    step = planned["ensemble"]
    assert step.section.member_dirs == {n: str(planned[f"evaluate.{n}"].out_dir) for n in ("lora", "full")}
    assert step.view["members"] == {f"evaluate.{n}": planned[f"evaluate.{n}"].fingerprint for n in ("lora", "full")}
    assert step.section.member_inputs["lora"] == {dep: str(tmp_path / dep / planned[dep if dep != "finetune" else
                                                  "finetune.lora"].fingerprint) for dep in ("tokenize", "pretrain", "taskdata", "finetune")}
    without = compose_config(["+experiment=tiny_techniques", f"paths.root={tmp_path}", "eval.ensemble=[]"])
    plain = {p.step.name: p.fingerprint for p in dag.plan(without, tmp_path)}
    assert "ensemble" not in plain and plain["evaluate.lora"] == planned["evaluate.lora"].fingerprint
    with pytest.raises(UserError, match="classification or generation"):
        augment.input_field("chat")
