"""Exported model directories, loaded the way MLflow and Hugging Face users load them, without our docs:
generation defaults, special-token ids, chat templates, model cards and adapters (tasks/modelcard.py).
A tiny experiment without a chat template, in this process (one rank, no Ray)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import warnings

import pytest
import yaml

from conf.schema import FinetuneStepConfig, PretrainStepConfig
from tasks import finetune, ingest, pretrain, taskdata, tokenize
from tasks.common import TaskContext

FINETUNES = {"lora_lm": ("lora", "lm", "classification"),
             "lora_classifier": ("lora", "classifier", "classification"),
             "full_classifier": ("full", "classifier", "classification"),
             "prefix_lm": ("prefix", "lm", "classification"), "chat": ("lora", "lm", "chat")}
"""Fine-tuning runs on the one pretrained model: name -> (method, objective, task kind)."""
LENGTH_WARNING = re.compile(r"maximum length|max_length|max_new_tokens|exceed|pad_token_id", re.IGNORECASE)


def chat_records(path):
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"] * 3
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Return of get_{n}{i}?"},
                                                       {"role": "assistant", "content": f"self.{n}{i}"}]})
                              for i, n in enumerate(names)))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single_rank):
    """A pretrain step and one finetune step per FINETUNES entry; their output directories by name."""
    from tests.conftest import compose_config

    root = tmp_path_factory.mktemp("exported")
    cfg = compose_config(["+experiment=tiny", "pretrain.num_workers=1", "pretrain.max_steps=2", "data.max_bytes=100000",
                          "tokenizer.chat_template=''", "tokenizer.additional_special_tokens=[]"])
    dirs = {name: root / name for name in ("ingest", "tokenize", "pretrain", "taskdata", "chat_taskdata")}
    for d in dirs.values():
        d.mkdir()
    ingest.run(cfg.data, {}, dirs["ingest"], TaskContext("ingest"))
    tokenize.run(cfg.tokenizer, {"ingest": dirs["ingest"]}, dirs["tokenize"], TaskContext("tokenize"))
    pretrain.train_worker(PretrainStepConfig(cfg.model, cfg.pretrain), {"tokenize": dirs["tokenize"]},
                          dirs["pretrain"], TaskContext("pretrain"))
    chat_file = chat_records(tmp_path_factory.mktemp("data") / "chat.jsonl")  # outside the run root
    tasks = {"classification": cfg.task, "chat": dataclasses.replace(cfg.task, kind="chat", builtin=None,
                                                                     train_path=str(chat_file), test_fraction=0.3)}
    taskdata.run(tasks["classification"], {}, dirs["taskdata"], TaskContext("taskdata"))
    taskdata.run(tasks["chat"], {}, dirs["chat_taskdata"], TaskContext("taskdata"))
    for name, (method, objective, kind) in FINETUNES.items():
        dirs[name] = root / name
        dirs[name].mkdir()
        ft = dataclasses.replace(cfg.finetune, method=method, objective=objective, max_steps=1, zero_stage=0)
        inputs = {"pretrain": dirs["pretrain"], "tokenize": dirs["tokenize"],
                  "taskdata": dirs["chat_taskdata" if kind == "chat" else "taskdata"]}
        finetune.train_worker(FinetuneStepConfig(ft, tasks[kind]), inputs, dirs[name], TaskContext("finetune"))
    return cfg, tasks, dirs


@contextlib.contextmanager
def captured_warnings():
    """Python warnings and transformers' logged warnings (its logger does not propagate) while in the block."""
    from transformers.utils import logging as hf_logging

    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        hf_logging.get_logger().removeHandler(handler)
        messages += [str(w.message) for w in caught]


@pytest.mark.parametrize("name,sub", [("pretrain", "model"), ("lora_lm", "merged"), ("chat", "merged")])
def test_text_generation_pipeline_needs_no_arguments(runs, name, sub):
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    _, _, dirs = runs
    model_dir = dirs[name] / sub
    with captured_warnings() as messages:
        generate = transformers.pipeline("text-generation", model=str(model_dir))
        text = generate("def main():\n    return")[0]["generated_text"]
    assert text.startswith("def main():") and not [m for m in messages if LENGTH_WARNING.search(m)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config, generation = generate.model.config, GenerationConfig.from_pretrained(model_dir)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id)
    assert tokenizer.bos_token == "<|bos|>" and config.bos_token_id == tokenizer.convert_tokens_to_ids("<|bos|>")
    # half the context is left for the prompt
    assert 0 < generation.max_new_tokens <= config.max_position_embeddings // 2


def test_chat_template_only_where_the_model_learned_one(runs):
    from transformers import AutoTokenizer

    _, tasks, dirs = runs
    base = AutoTokenizer.from_pretrained(dirs["pretrain"] / "model")
    messages = [{"role": "user", "content": "Return of get_alpha0?"}]
    with pytest.raises(ValueError, match="chat template"):
        base.apply_chat_template(messages, tokenize=False)
    for name in ("pretrain", "lora_lm"):  # not chat models, and their cards say so
        sub = "model" if name == "pretrain" else "adapter"
        assert "## Chat model\n\nNo. " in (dirs[name] / sub / "README.md").read_text()
    record = {"messages": [*messages, {"role": "assistant", "content": "self.alpha0"}]}
    _, trained_prompt, _, _ = taskdata.render(record, tasks["chat"])
    for sub in ("adapter", "merged"):  # a chat fine-tune's tokenizer renders the prompt it was trained on
        chat = AutoTokenizer.from_pretrained(dirs["chat"] / sub)
        assert chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == trained_prompt
        assert "## Chat model\n\nYes. " in (dirs["chat"] / sub / "README.md").read_text()


def exported_dirs(dirs) -> list:
    subs = [dirs["pretrain"] / "model"]
    for name in FINETUNES:
        subs += [dirs[name] / sub for sub in ("adapter", "merged", "model") if (dirs[name] / sub).is_dir()]
    return subs


def test_every_export_has_a_model_card(runs):
    _, _, dirs = runs
    for model_dir in exported_dirs(dirs):
        card = (model_dir / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["library_name"] == ("peft" if model_dir.name == "adapter" else "transformers"), model_dir
        assert "lmforge" in meta["tags"] and "license" not in meta
        classifier = "classifier" in model_dir.parent.name
        assert meta["pipeline_tag"] == ("text-classification" if classifier else "text-generation")
        if model_dir.parent.name != "pretrain":
            assert (model_dir / meta["base_model"]).resolve() == (dirs["pretrain"] / "model").resolve()
        for section in ("## Training data", "## Method", "## Metrics", "## Chat model", "## How to load it"):
            assert section in card, (model_dir, section)
        assert "More Information Needed" not in card and str(dirs["pretrain"].parent) not in card  # no run root
        assert not re.search(r"\d{4}-\d\d-\d\d", card)  # no dates: a rerun writes the same bytes


def card_code(model_dir) -> str:
    code = re.search(r"```python\n(.*?)```", (model_dir / "README.md").read_text(), re.DOTALL).group(1)
    return code.replace('"path/to/this/directory"', repr(str(model_dir)))


@pytest.mark.parametrize("name,sub", [("lora_lm", "adapter"), ("prefix_lm", "adapter"), ("lora_classifier", "adapter"),
                                      ("full_classifier", "model"), ("lora_classifier", "merged")])
def test_the_cards_loading_code_works_from_another_directory(runs, name, sub, tmp_path, monkeypatch):
    """The card's code as a user would paste it, run elsewhere: PeftModel over the base model the card
    names relative to the adapter, and AutoPeftModel through adapter_config.json."""
    from peft import PeftModel

    _, _, dirs = runs
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(card_code(dirs[name] / sub), namespace)
    model = namespace["model"]
    if sub == "adapter":
        assert isinstance(model, PeftModel)
        adapter_config = json.loads((dirs[name] / sub / "adapter_config.json").read_text())
        assert os.path.isabs(adapter_config["base_model_name_or_path"])  # PEFT reads a relative one from the cwd
    if "classifier" in name:
        labels = taskdata.load_labels(dirs["taskdata"])
        assert [model.config.id2label[i] for i in range(len(labels))] == labels


def test_an_adapter_that_trains_the_embeddings_is_one_function_in_every_loading_path(runs):
    """lora_lm trains a copy of embed_tokens (modules_to_save) over a model pretrained with its head tied
    to the embeddings. The pretrained model is exported untied (equal values), so PeftModel,
    PeftModel + tie_weights() (what lm-evaluation-harness calls after loading `peft=`),
    AutoPeftModelForCausalLM and merged/ all compute what the pipeline trained and evaluated."""
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.models import load_base_model, load_tuned

    _, _, dirs = runs
    base_dir, adapter_dir = dirs["pretrain"] / "model", dirs["lora_lm"] / "adapter"
    assert "embed_tokens" in json.loads((adapter_dir / "adapter_config.json").read_text())["modules_to_save"]
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 21, 60]])
    with torch.no_grad():
        trained = load_tuned(dirs["lora_lm"], base_dir).eval()
        expected = trained(input_ids=ids).logits
        tied_base = load_base_model(base_dir)  # lmforge's loader: tied, as in pretraining
        assert tied_base.get_output_embeddings().weight is tied_base.get_input_embeddings().weight
        copy = trained.base_model.model.model.embed_tokens.modules_to_save["default"].weight
        assert not torch.equal(copy, tied_base.get_input_embeddings().weight)  # the adapter moved the embeddings
        paths = {"PeftModel": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)}
        paths["PeftModel + tie_weights()"] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                                                       adapter_dir)
        paths["PeftModel + tie_weights()"].tie_weights()
        paths["AutoPeftModelForCausalLM"] = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
        paths["merged/"] = AutoModelForCausalLM.from_pretrained(dirs["lora_lm"] / "merged")
        for name, model in paths.items():
            error = (model.eval()(input_ids=ids).logits - expected).abs().max().item()
            assert error < 1e-4, f"{name}: logits differ by {error:.3g}"
