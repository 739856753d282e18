"""The tracking journal without a server: a Tracker whose server is down records every call
(runs, params, metrics from a worker's logger, tags, files, a table, the model registration)
and the replay puts all of it into a real MLflow store, once, even when interrupted."""
from __future__ import annotations

import pytest

from pipelines import tracking
from pipelines.journal import Journal
from tasks.common import UserError
from tests.conftest import save_tiny_model
from tests.integration.test_resume import free_port


def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_an_unreachable_server_is_refused_by_default(tmp_path):
    uri = dead_uri()
    with pytest.raises(UserError, match=f"tracking.uri: the MLflow server {uri} cannot be reached"):
        tracking.Tracker(uri, "exp", tmp_path)


def record_a_run(tmp_path):
    tracker = tracking.Tracker(dead_uri(), "exp", tmp_path, on_unreachable="journal")
    parent = tracker.start("tiny", {"pretrain": {"lr": 0.1}, "api_token": "s3cret"}, {"lmforge.experiment": "tiny"})
    child = tracker.start_step("finetune", "fp123", "run", "no earlier run", {"finetune": {"r": 4}})
    tracker.log_inputs(child, [{"name": "task splits", "digest": "fp456", "source": "/runs/taskdata/fp456",
                                "context": "training"}])
    logger = tracker.metric_logger(child)
    for step in range(1, 4):
        logger({"loss": 1.0 / step, "flag": True}, step)  # what a training worker does
    model = save_tiny_model(tmp_path / "merged", labels=["no", "yes"])
    (tmp_path / "history.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "val_loss": 1.7}\n')
    tracker.log_loss_curve(child, tmp_path / "history.jsonl", "finetune loss")
    tracker.log_table(parent, [{"model": "finetuned", "accuracy": 0.5}], "evaluation.json")
    tracker.register_model("lmforge-tiny", "candidate", child, {"merged": model}, {"lmforge.fingerprint": "fp123"},
                           "question 3\n### Label:")
    tracker.end(child)
    tracker.set_tags(parent, {"lmforge.cache_hits": "0/1"})
    tracker.end(parent)
    return tracker, parent, child


def test_every_call_is_journaled_and_replayed_once_even_when_interrupted(tmp_path, monkeypatch):
    tracker, parent, child = record_a_run(tmp_path)
    outcome = tracker.finish()
    assert outcome["replayed"] is False and parent.startswith("pending-")
    assert "log_batch" in outcome["calls"] and "register" in outcome["calls"]
    assert "s3cret" not in Journal(tracker.journal.directory).calls_path.read_text()

    store = f"sqlite:///{tmp_path / 'replayed.db'}"
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts in ./mlruns
    real = tracking.APPLY["log_table"]

    def fail(*_):
        raise ConnectionError("server went away during the replay")

    monkeypatch.setitem(tracking.APPLY, "log_table", fail)
    with pytest.raises(ConnectionError):
        tracking.replay(tracker.journal.directory, store)
    assert 0 < tracker.journal.progress()["done"] < len(tracker.journal.calls())
    monkeypatch.setitem(tracking.APPLY, "log_table", real)
    assert tracking.replay(tracker.journal.directory, store) == len(tracker.journal.calls())
    tracking.replay(tracker.journal.directory, store)  # a finished replay sends nothing again

    ids = tracker.journal.progress()["ids"]
    client = tracking._client(store)
    assert len(client.search_runs([client.get_experiment_by_name("exp").experiment_id])) == 2  # no run twice
    parent_run, child_run = client.get_run(ids[parent]), client.get_run(ids[child])
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["lmforge.cache_hits"] == "0/1"
    assert parent_run.data.params["api_token"] == "***" and parent_run.data.params["pretrain.lr"] == "0.1"
    assert child_run.data.tags["mlflow.parentRunId"] == ids[parent]
    assert [m.value for m in client.get_metric_history(ids[child], "loss")] == [1.0, 0.5, 1.0 / 3]
    assert "flag" not in child_run.data.metrics
    assert {a.path for a in client.list_artifacts(ids[child])} >= {"loss_curve.png"}
    assert {a.path for a in client.list_artifacts(ids[parent])} == {"evaluation.json"}
    (read,) = child_run.inputs.dataset_inputs
    assert (read.dataset.name, read.dataset.digest, read.dataset.source) == ("task splits", "fp456", "/runs/taskdata/fp456")
    assert [(t.key, t.value) for t in read.tags] == [("mlflow.data.context", "training")]
    version = client.get_model_version_by_alias("lmforge-tiny", "candidate")
    assert version.run_id == ids[child] and version.tags["lmforge.fingerprint"] == "fp123"
    assert version.source.startswith("models:/m-")  # a LoggedModel, in the transformers flavor
    from mlflow.pyfunc import load_model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(store):
        predicted = load_model("models:/lmforge-tiny@candidate").predict(["question 3\n### Label:"])
    assert list(predicted["label"]) in (["no"], ["yes"]) and 0 < predicted["score"][0] <= 1


@pytest.mark.parametrize("objective", ["classifier", "lm"])
def test_a_prefix_tuned_result_is_a_pyfunc_model_that_predicts_as_lmforge_does(tmp_path, monkeypatch, objective):
    """No merged weights for MLflow's transformers flavor: the version is a pyfunc model from code that
    carries the pretrained model and the adapter, and predicts what lmforge's loader predicts."""
    import json

    import torch
    from mlflow.pyfunc import load_model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from conf.schema import FinetuneConfig
    from tasks import finetune
    from tasks.models import load_base_model, load_tuned

    labels = ["no", "yes"]
    base_dir = save_tiny_model(tmp_path / "pretrain" / "model")
    out = tmp_path / "finetune"
    (out / "adapter").mkdir(parents=True)
    meta = {"objective": objective, "labels": labels, "pad_token_id": 0, "pooling": "last"}
    (out / "objective.json").write_text(json.dumps(meta))
    torch.manual_seed(2)
    base = load_base_model(base_dir, labels if objective == "classifier" else None, 0)
    tuned = get_peft_model(base, finetune.prefix_config(FinetuneConfig(method="prefix"), objective))
    for param in tuned.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.5)  # a prefix (and head) that changes the answer
    tuned.save_pretrained(str(out / "adapter"))
    prompt = "question 3 answer 21"
    ids = torch.tensor([AutoTokenizer.from_pretrained(base_dir).encode(prompt, add_special_tokens=False)])
    ours = load_tuned(out, base_dir).eval()
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts in ./mlruns
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.Tracker(store, "exp", tmp_path)
    tracker.start("tiny", {}, {})
    child = tracker.start_step("finetune", "fp9", "run", "no earlier run", {})
    assert tracker.register_model("lmforge-p", "candidate", child, {"adapter": out / "adapter"},
                                  {"lmforge.fingerprint": "fp9"}, prompt) == "1"
    client = tracking._client(store)
    assert client.get_model_version_by_alias("lmforge-p", "candidate").source.startswith("models:/m-")
    assert "finetuned/adapter" in [a.path for a in client.list_artifacts(child, "finetuned")]
    with _use_tracking_uri(store):
        served = load_model("models:/lmforge-p@candidate")
    with torch.no_grad():
        if objective == "classifier":
            probs = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.softmax(-1)[0]
            predicted = served.predict([prompt])
            assert list(predicted["label"]) == [labels[int(probs.argmax())]]
            assert abs(predicted["score"][0] - probs.max().item()) < 1e-5
        else:
            greedy = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
            expected = AutoTokenizer.from_pretrained(base_dir).decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
            assert served.predict([prompt], params={"max_new_tokens": 4}) == [expected]


def test_a_mean_pooled_classifier_is_an_mlflow_model_with_its_class(tmp_path, monkeypatch):
    """The exported class file travels in the transformers flavor: pyfunc and the transformers loader
    rebuild the mean-pooled head and give lmforge's own prediction."""
    import torch
    from mlflow.pyfunc import load_model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from transformers import AutoTokenizer

    from tasks.models import load_saved, mark_if_pooled
    from tasks.pooled_classifier import MeanPooledLlamaForSequenceClassification

    plain = save_tiny_model(tmp_path / "plain", labels=["no", "yes"])
    merged = tmp_path / "merged"
    torch.manual_seed(1)
    MeanPooledLlamaForSequenceClassification.from_pretrained(plain).save_pretrained(merged)
    AutoTokenizer.from_pretrained(plain).save_pretrained(merged)
    mark_if_pooled(merged)
    prompt = "question 3 answer 21"
    tokenizer, ours = AutoTokenizer.from_pretrained(merged), load_saved(merged).eval()
    with torch.no_grad():
        probs = ours(**tokenizer(prompt, return_tensors="pt")).logits.softmax(-1)[0]
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts in ./mlruns
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.Tracker(store, "exp", tmp_path)
    tracker.start("tiny", {}, {})
    child = tracker.start_step("finetune", "fp7", "run", "no earlier run", {})
    assert tracker.register_model("lmforge-m", "candidate", child, {"merged": merged},
                                  {"lmforge.fingerprint": "fp7"}, prompt) == "1"
    with _use_tracking_uri(store):
        predicted = load_model("models:/lmforge-m@candidate").predict([prompt])
        import mlflow.transformers

        pipeline = mlflow.transformers.load_model("models:/lmforge-m@candidate")
    assert type(pipeline.model).__name__ == "MeanPooledLlamaForSequenceClassification"
    assert list(predicted["label"]) == [["no", "yes"][int(probs.argmax())]]
    assert abs(predicted["score"][0] - probs.max().item()) < 1e-5

