"""The whole DAG through the real command line on local Ray: manifests, MLflow runs, exported
model and adapter, cache hits on rerun, targeted reruns after a config change, fast failures."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from pipelines import artifacts
from tests.conftest import REPO

STEPS = ["ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune", "evaluate"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def pipeline(root, *overrides, expect=0):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}", "ray.num_cpus=2", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    found = re.search(r"summary JSON:\s+(\S+)", proc.stdout)
    summary = json.loads(open(found.group(1)).read()) if found else None
    return proc, summary


def statuses(summary):
    return {s["name"]: s["status"] for s in summary["steps"]}


def mlflow_client(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


@pytest.fixture(scope="module")
def store_uri(root):
    """A step store (paths.store) as a file:// URI: the same pyarrow.fs code path as s3:// or gs://."""
    return (root.parent / f"{root.name}-store").as_uri()


@pytest.fixture(scope="module")
def first_run(root, store_uri):
    return pipeline(root, f"paths.store={store_uri}")


@pytest.fixture(scope="module")
def lora_rank_run(first_run, root):
    """The first run's config with another LoRA rank, in the same root."""
    return pipeline(root, "finetune.lora.r=4")


def published(root, step) -> set[str]:
    """Fingerprints of the step's results under root (directories with a manifest)."""
    return {d.name for d in (root / step).iterdir() if artifacts.read_manifest(d)}


def failed_step_runs(root, experiment_id, step) -> dict:
    """The step's MLflow runs that ended FAILED, by run id."""
    runs = mlflow_client(root).search_runs(
        [experiment_id], filter_string=f"tags.lmforge.step = '{step}' and attributes.status = 'FAILED'")
    return {run.info.run_id: run for run in runs}


def test_first_run_writes_every_step_and_reports(first_run, root):
    proc, summary = first_run
    assert statuses(summary) == {name: "ran" for name in STEPS}
    for step in summary["steps"]:
        manifest = artifacts.read_manifest(artifacts.step_dir(root, step["name"], step["fingerprint"]))
        assert manifest["fingerprint"] == step["fingerprint"] and manifest["files"]
    assert not list((root / ".ray_train").iterdir())  # each published training step's attempts are removed
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    evaluate = next(s for s in summary["steps"] if s["name"] == "evaluate")["metrics"]
    for key in ("ppl_unigram", "ppl_pretrained", "ppl_finetuned", "majority_accuracy", "untuned_accuracy",
                "finetuned_accuracy", "finetuned_macro_f1"):
        assert key in evaluate


def test_mlflow_has_a_parent_with_one_child_per_step(first_run, root):
    _, summary = first_run
    client = mlflow_client(root)
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["pretrain.zero_stage"] == "2"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    by_step = {c.data.tags["lmforge.step"]: c for c in children}
    assert sorted(by_step) == sorted(STEPS)
    assert all(c.data.metrics and c.data.tags["lmforge.status"] == "run" for c in children)
    history = client.get_metric_history(by_step["pretrain"].info.run_id, "loss")
    assert len(history) >= 4 and {m.step for m in history} >= {2, 4, 6, 8}
    assert "config.yaml" in [a.path for a in client.list_artifacts(summary["run_id"])]
    assert {"loss_curve.png", "_manifest.json"} <= {a.path for a in client.list_artifacts(by_step["pretrain"].info.run_id)}
    assert {"report.json", "samples.json"} <= {a.path for a in client.list_artifacts(by_step["evaluate"].info.run_id)}


def test_exported_model_and_adapter_load_in_transformers_and_peft(first_run, root):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, summary = first_run
    dirs = {s["name"]: artifacts.step_dir(root, s["name"], s["fingerprint"]) for s in summary["steps"]}
    model = AutoModelForCausalLM.from_pretrained(dirs["pretrain"] / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(dirs["pretrain"] / "model")
    probe = load_file(dirs["pretrain"] / "export_check.safetensors")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
    assert tokenizer.eos_token_id is not None and len(tokenizer) == model.config.vocab_size

    tuned = PeftModel.from_pretrained(model, dirs["finetune"] / "adapter").eval()
    with torch.no_grad():
        assert tuned(input_ids=probe["input_ids"]).logits.shape == logits.shape


def test_immediate_rerun_is_all_cached(first_run, root):
    proc, summary = pipeline(root)
    assert statuses(summary) == {name: "cached" for name in STEPS}
    assert proc.stdout.count(": cached (") == len(STEPS)


def test_another_root_takes_every_step_from_the_store(first_run, root, store_uri, tmp_path):
    """A fresh machine or cluster (another paths.root) with the same store computes nothing: each
    step is downloaded, checked against its manifest and used, byte for byte the same."""
    assert first_run[0].stdout.count("uploaded to the step store") == len(STEPS)
    elsewhere = tmp_path / "elsewhere"
    proc, summary = pipeline(elsewhere, f"paths.store={store_uri}")
    assert statuses(summary) == {name: "cached" for name in STEPS}
    assert proc.stdout.count("downloaded from the step store") == len(STEPS)
    assert "uploaded to the step store" not in proc.stdout
    for step in summary["steps"]:
        here = artifacts.read_manifest(root / step["name"] / step["fingerprint"])
        assert artifacts.read_manifest(elsewhere / step["name"] / step["fingerprint"]) == here
        assert not artifacts.damage(elsewhere / step["name"] / step["fingerprint"], here)


def test_changed_lora_rank_reruns_only_finetune_and_evaluate(lora_rank_run):
    proc, summary = lora_rank_run
    assert [n for n, s in statuses(summary).items() if s == "ran"] == ["finetune", "evaluate"]
    assert "config changed (finetune.lora.r: 16 -> 4)" in proc.stdout


def test_prefix_tuning_under_zero3_on_two_workers(first_run, root):
    from peft import PeftConfig

    _, summary = pipeline(root, "finetune=prefix", "finetune.zero_stage=3",
                          "finetune.num_workers=2", "finetune.cpus_per_worker=1", "finetune.micro_batch_size=2",
                          "finetune.max_steps=2", "finetune.log_every=1", "finetune.eval_every=2")
    assert [n for n, s in statuses(summary).items() if s == "ran"] == ["finetune", "evaluate"]
    finetune = next(s for s in summary["steps"] if s["name"] == "finetune")
    adapter = artifacts.step_dir(root, "finetune", finetune["fingerprint"]) / "adapter"
    assert PeftConfig.from_pretrained(adapter).peft_type.value == "PREFIX_TUNING"


def test_dry_run_prints_the_plan_only(lora_rank_run, root):
    proc, summary = pipeline(root, "finetune.lora.r=2", "dry_run=true")
    assert summary is None
    # explained against the closest earlier run: ranks 16 and 4 are one change away, the newer one is taken
    assert re.search(r"finetune\s+run\s+\w+\s+config changed \(finetune.lora.r: 4 -> 2\)", proc.stdout)
    assert re.search(r"pretrain\s+cached", proc.stdout)


def test_missing_corpus_fails_before_any_work(tmp_path):
    proc, _ = pipeline(tmp_path, "data=files", f"data.paths=[{tmp_path}/none/*.txt]", expect=2)
    assert proc.stderr.strip().splitlines()[-1] == f"error: data.paths[0]: no file matches '{tmp_path}/none/*.txt'"
    assert not (tmp_path / "ingest").exists()


def test_failed_step_leaves_no_result_and_is_retried_by_the_next_launch(first_run, root):
    """Nothing of a failed step is published or kept as an unfinished attempt, so launching the same
    config again runs the step again: two attempts, each a FAILED MLflow run of the same fingerprint."""
    experiment_id = mlflow_client(root).get_run(first_run[1]["run_id"]).info.experiment_id
    results, failed_before = published(root, "tokenize"), failed_step_runs(root, experiment_id, "tokenize")
    for _ in range(2):
        proc, _ = pipeline(root, "tokenizer.val_fraction=0.0001", expect=2)
        assert "error: tokenizer.seq_len: the val split has fewer than" in proc.stderr
        assert re.search(r"ingest: cached \(", proc.stdout)
        # run again, not cached, and not resumed as "an earlier attempt did not finish"
        assert "tokenize: running, config changed (val_fraction: 0.2 -> 0.0001)" in proc.stdout
        assert published(root, "tokenize") == results
        assert not [d for d in (root / "tokenize").iterdir() if d.name.startswith(".staging")]
    attempts = [run for run_id, run in failed_step_runs(root, experiment_id, "tokenize").items()
                if run_id not in failed_before]
    assert len(attempts) == 2
    assert len({run.data.tags["mlflow.parentRunId"] for run in attempts}) == 2  # one per launch
    fingerprints = {run.data.tags["lmforge.fingerprint"] for run in attempts}
    assert len(fingerprints) == 1 and not fingerprints & results
    assert all(run.data.tags["lmforge.error"].startswith("tokenizer.seq_len: the val split has fewer than")
               for run in attempts)
