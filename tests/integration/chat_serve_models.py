"""A finished run's published steps, made without running the pipeline: a tiny pretrained Llama and
two LoRA branches on it (random, distinct adapter weights; chat tokenizers), laid out as the pretrain
and finetune steps publish them, plus a classifier branch and the run summary. For the tests of
pipelines.chat and pipelines.serve."""
from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import save_tiny_model

RUN_ID = "0123456789abcdef0123456789abcdef"
EXPERIMENT = "chatdemo"
PRETRAIN_FP = "aaaaaaaaaaaaaaaa"
BRANCHES = {"alpha": "bbbbbbbbbbbbbbbb", "beta": "cccccccccccccccc", "cls": "dddddddddddddddd",
            "narrow": "eeeeeeeeeeeeeeee"}
NARROW_VOCAB = 300
"""The `narrow` branch: a full model whose embeddings end at this id, below its tokenizer's vocabulary (a
broken export): prompts with higher token ids fail in the forward pass, for the error-isolation test."""
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def readable_decoding(model_dir: Path) -> None:
    """The tiny tokenizer with a byte-level decoder (as the pipeline's tokenizers have), so that
    generated text reads as text rather than byte symbols."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save_pretrained(str(model_dir))


def save_adapter(base_dir: Path, adapter_dir: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from tasks.models import load_base_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        modules_to_save=["embed_tokens"], init_lora_weights=False)  # not a no-op: branches differ
    model = get_peft_model(load_base_model(base_dir), config)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.chat_template = CHAT_TEMPLATE  # what a chat task's finetune step saves with the adapter
    tokenizer.save_pretrained(str(adapter_dir))


def save_narrow_model(base_dir: Path, model_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(5)
    config = AutoConfig.from_pretrained(str(base_dir))
    config.vocab_size = NARROW_VOCAB
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(model_dir))


def make_run(root: Path) -> Path:
    """`root` with one finished run of experiment 'chatdemo': pretrain, finetune.alpha and .beta (LoRA,
    chat task), finetune.cls (a classifier), finetune.narrow (a full model that fails on high token
    ids). Returns the pretrained model's directory."""
    pretrain = root / "pretrain" / PRETRAIN_FP
    save_tiny_model(pretrain / "model")
    readable_decoding(pretrain / "model")
    write_json(pretrain / "_manifest.json", {"step": "pretrain", "fingerprint": PRETRAIN_FP})
    steps = [{"name": "pretrain", "fingerprint": PRETRAIN_FP, "out_dir": str(pretrain), "status": "ran"}]
    for seed, (branch, fingerprint) in enumerate(BRANCHES.items()):
        step_dir = root / "finetune" / fingerprint
        classifier = branch == "cls"
        if branch == "narrow":
            save_narrow_model(pretrain / "model", step_dir / "model")
        elif not classifier:
            save_adapter(pretrain / "model", step_dir / "adapter", seed)
        write_json(step_dir / "objective.json", {"objective": "classifier" if classifier else "lm", "labels": None,
                                                 "pad_token_id": 0, "pooling": "last"})
        write_json(step_dir / "_manifest.json", {
            "step": "finetune", "fingerprint": fingerprint, "upstream": {"pretrain": PRETRAIN_FP},
            "config": {"finetune": {"method": "full" if branch == "narrow" else "lora", "init": "pretrained"},
                       "task": {"kind": "classification" if classifier else "chat"}}})
        steps.append({"name": f"finetune.{branch}", "fingerprint": fingerprint, "out_dir": str(step_dir),
                      "status": "ran"})
    write_json(root / "runs" / f"{RUN_ID}.json", {"run_id": RUN_ID, "experiment": EXPERIMENT, "root": str(root),
                                                  "steps": steps})
    return pretrain / "model"


def store_run(root: Path, store_dir: Path) -> str:
    """make_run's run as a run with paths.root=<an object store> leaves it, in a file:// store: every
    step sealed (its files with sizes and hashes, the digest) and uploaded, the summary under runs/.
    Returns the store's URI."""
    import shutil

    from pipelines import artifacts, store

    uri = store_dir.as_uri()
    step_store = store.open_store(uri)
    sealing = store_dir.parent / f"{store_dir.name}-sealing"
    shutil.copytree(root, sealing)
    for manifest_path in sorted(sealing.glob("*/*/_manifest.json")):
        manifest = artifacts.seal(manifest_path.parent, json.loads(manifest_path.read_text()))
        step_store.push(manifest_path.parent, manifest)
    step_store.put_json(f"runs/{RUN_ID}.json", json.loads((root / "runs" / f"{RUN_ID}.json").read_text()))
    shutil.rmtree(sealing)
    return uri
