"""Exported models as MLflow models (part of pipelines/tracking.py, the only module that talks to
MLflow): an exported directory in MLflow's `transformers` flavor (MLmodel, pipeline task, signature,
input example, pinned requirements), logged as an MLflow 3 LoggedModel linked to the step's run, so
`mlflow.pyfunc.load_model`, `mlflow.transformers.load_model` and `mlflow models serve` work on it.

A sequence classifier becomes a `text-classification` pipeline (labels from config.id2label), anything
else `text-generation` (greedy, the exported generation defaults; `max_new_tokens` a param). A
prefix-tuned result has no merged weights (PEFT's prefix tuning of a sequence classifier needs
lmforge's loader, tasks/models.py): it is registered as a pyfunc model from code
(pipelines/prefix_pyfunc.py) that carries the pretrained model and the adapter. A mean-pooled
classifier is loaded as its exported directory declares it (auto_map, remote code from the
directory itself): the flavor saves the class file with the weights, and MLflow's loaders rebuild
that class.

It also holds the two model calls of tracking.APPLY (used live and when a journal is replayed):
`log_model` (a pretrained model) and `register` (a fine-tuned result into the Model Registry).
"""
from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors")
"""Pinned from this environment; MLflow's defaults for the flavor add torchvision, which a text model
does not use (and this environment does not have)."""


def run_of(call: dict, ids: dict) -> str:
    """The real run id of a tracking call (a journal replay maps pending ids to the runs it created)."""
    return ids.get(call["run"], call["run"])


def requirements() -> list[str]:
    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def full_weights(dirs: dict[str, str]) -> str | None:
    """The directory of an exported result's full weights (merged LoRA or full fine-tuning)."""
    return next((dirs[sub] for sub in ("merged", "model") if sub in dirs), None)


def load_exported(model_dir: str):
    """An exported directory as a Hugging Face user loads it: a mean-pooled classifier through its
    auto_map (the class file beside the weights, which the flavor then saves with them)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks.models import is_mean_pooled, load_saved

    if is_mean_pooled(Path(model_dir)):
        return AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True,
                                                                  dtype=torch.float32)
    return load_saved(Path(model_dir))


def save_flavor(model_dir: str, example: str, out: Path) -> None:
    """An exported model directory as an MLflow model at `out`."""
    import mlflow.transformers
    from mlflow.models import infer_signature
    from transformers import AutoTokenizer

    from tasks.models import is_classifier

    model = load_exported(model_dir)
    if is_classifier(model):
        task, signature = "text-classification", infer_signature(example, {"label": "label", "score": 1.0})
    else:
        task = "text-generation"
        signature = infer_signature(example, "generated text",
                                    params={"max_new_tokens": model.generation_config.max_new_tokens or 32})
    mlflow.transformers.save_model({"model": model, "tokenizer": AutoTokenizer.from_pretrained(model_dir)}, str(out),
                                   task=task, signature=signature, input_example=example,
                                   pip_requirements=requirements())


def save_prefix_model(adapter_dir: str, example: str, out: Path) -> None:
    """A prefix-tuned result (no merged weights) as a pyfunc model from code (pipelines/prefix_pyfunc.py):
    the pretrained model its adapter names, the adapter and objective.json as artifacts."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from tasks import prefix_cache
    from tasks.models import OBJECTIVE_FILE

    adapter = Path(adapter_dir)
    objective = adapter.parent / OBJECTIVE_FILE
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    classifier = json.loads(objective.read_text())["objective"] == "classifier"
    signature = (infer_signature([example], [{"label": "label", "score": 1.0}]) if classifier
                 else infer_signature([example], ["generated text"], params={"max_new_tokens": 32}))
    mlflow.pyfunc.save_model(str(out), python_model=str(Path(__file__).with_name("prefix_pyfunc.py")),
                             artifacts={"base": base, "adapter": str(adapter), "objective": str(objective)},
                             code_paths=[prefix_cache.__file__], signature=signature, input_example=[example],
                             pip_requirements=[*requirements(), f"peft=={version('peft')}", f"pandas=={version('pandas')}"])


def is_prefix_adapter(adapter_dir: str) -> bool:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("peft_type") == "PREFIX_TUNING"


def log_model(client, run_id: str, name: str, model_dir: str, example: str, save=None) -> str:
    """Log `model_dir` as a LoggedModel named `name`, an output of run `run_id` (saved by `save`,
    default the transformers flavor); returns its model id."""
    from mlflow.entities import LoggedModelOutput

    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id)
    with tempfile.TemporaryDirectory(prefix="lmforge-mlflow-model-") as tmp:
        (save or save_flavor)(model_dir, example, Path(tmp) / "model")
        client.log_model_artifacts(model.model_id, str(Path(tmp) / "model"))
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


# --- the journal's model calls (tracking.APPLY) ---------------------------------------------------

def apply_log_model(client, call: dict, ids: dict) -> str:
    return log_model(client, run_of(call, ids), call["name"], call["model_dir"], call["example"])


def apply_register(client, call: dict, ids: dict) -> str:
    """One registry version per fine-tuned result (by fingerprint): its full weights logged once in
    MLflow's transformers flavor (a LoggedModel of the step's run), a PEFT adapter as files under
    `finetuned/adapter`, and the alias moves to it. A prefix-tuned result is a pyfunc model
    (save_prefix_model); anything else without full weights is its files under `finetuned/`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    name, run_id, fingerprint, dirs = call["name"], run_of(call, ids), call["fingerprint"], call["dirs"]
    found = client.search_model_versions(f"name='{name}' and tag.`lmforge.fingerprint`='{fingerprint}'")
    if found:
        version = max(found, key=lambda v: int(v.version)).version
    else:
        weights, model_id = full_weights(dirs), None
        prefix = weights is None and "adapter" in dirs and is_prefix_adapter(dirs["adapter"])
        for sub, path in dirs.items():
            if sub == "adapter" or not (weights or prefix):
                client.log_artifacts(run_id, path, f"finetuned/{sub}")
        if weights:
            model_id = log_model(client, run_id, "finetuned", weights, call["example"])
        elif prefix:
            model_id = log_model(client, run_id, "finetuned", dirs["adapter"], call["example"], save_prefix_model)
        try:
            client.create_registered_model(name, description="Fine-tuned by lmforge (pipelines.run).")
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"models:/{model_id}" if model_id else f"{client.get_run(run_id).info.artifact_uri}/finetuned"
        with _use_tracking_uri(client.tracking_uri):  # a local registry finds the LoggedModel through it
            version = client.create_model_version(name, source, run_id=run_id, tags=call["tags"],
                                                  model_id=model_id).version
    client.set_registered_model_alias(name, call["alias"], version)
    return str(version)
