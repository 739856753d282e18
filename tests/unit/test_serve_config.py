"""Serving a finished run after the pipeline (`serve` of the config, serving_models.after_run) and on a
cluster (cluster/serve-config.yaml, cluster/kuberay/rayservice.yaml): the command a run prints, the
server it starts with serve.enabled=true, and Serve configs that Ray accepts and that build this
project's application with options pipelines.serve knows."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from pipelines import serve, serving_models
from tests.conftest import REPO, compose_config

SUMMARY = {"run_id": "feedbeef", "steps": [{"name": "ingest"}, {"name": "pretrain"}, {"name": "finetune"}]}
SERVE_CONFIG = REPO / "cluster" / "serve-config.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"


def printed(cfg, summary, capsys) -> str:
    serving_models.after_run(cfg, summary)
    return capsys.readouterr().out


def test_the_printed_command_names_the_absolute_root_the_run_and_the_serve_section(capsys):
    cfg = compose_config(["+experiment=tiny", "paths.root=runs_here"])
    assert printed(cfg, SUMMARY, capsys) == (f"serve it with:     python -m pipelines.serve --root "
                                             f"{Path('runs_here').resolve()} --run-id feedbeef --port 8000\n")
    cfg = compose_config(["+experiment=tiny", "paths.root=s3://bucket/lm forge", "serve.host=0.0.0.0",
                          "serve.port=9000", "serve.num_cpus=3", "serve.max_batch_size=2", "ray.address=auto"])
    assert printed(cfg, SUMMARY, capsys).split(":", 1)[1].strip() == (
        "python -m pipelines.serve --root 's3://bucket/lm forge' --run-id feedbeef --port 9000 --host 0.0.0.0 "
        "--num-cpus 3 --max-batch-size 2 --address auto")


def test_nothing_is_printed_for_a_dry_run_or_a_run_without_a_model(capsys):
    assert printed(compose_config(["+experiment=tiny", "dry_run=true"]), {"plan": []}, capsys) == ""
    assert printed(compose_config(["+experiment=tiny"]), {"run_id": "x", "steps": [{"name": "ingest"}]}, capsys) == ""


def test_serve_enabled_serves_with_the_printed_arguments(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(serve, "main", lambda argv: calls.append(argv) or 0)
    cfg = compose_config(["+experiment=tiny", "paths.root=/srv/runs", "serve.port=8100"])
    command = printed(cfg, SUMMARY, capsys).split("python -m pipelines.serve ", 1)[1].split()
    cfg.serve.enabled = True
    assert printed(cfg, SUMMARY, capsys) == "" and calls == [command]
    monkeypatch.setattr(serve, "main", lambda argv: 2)  # serve printed its error: the run exits with its code
    with pytest.raises(SystemExit) as stopped:
        serving_models.after_run(cfg, SUMMARY)
    assert stopped.value.code == 2


def test_serve_enabled_in_a_sweep_prints_the_command_instead_of_blocking(monkeypatch, capsys):
    monkeypatch.setattr(serve, "main", lambda argv: pytest.fail("a sweep must not block in a server"))
    monkeypatch.setattr(serving_models, "sweeping", lambda: True)
    out = printed(compose_config(["+experiment=tiny", "serve.enabled=true"]), SUMMARY, capsys)
    assert out.startswith("serve.enabled: a sweep (-m)") and "--run-id feedbeef" in out


def applications() -> dict[str, list[dict]]:
    """The Serve applications of the config file and of the RayService, each checked by Ray's own schema."""
    from ray.serve.schema import ServeDeploySchema

    service = next(d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d["kind"] == "RayService")
    configs = {"serve-config.yaml": yaml.safe_load(SERVE_CONFIG.read_text()),
               "rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}
    for config in configs.values():
        ServeDeploySchema.model_validate(config)
    return {name: config["applications"] for name, config in configs.items()}


def test_serve_configs_pass_rays_schema_and_build_this_projects_application():
    found = applications()
    assert found["serve-config.yaml"] == found["rayservice.yaml"]
    for app in found["serve-config.yaml"]:
        module, name = app["import_path"].split(":")
        assert getattr(importlib.import_module(module), name) is serve.build_app
        known = {a.dest for a in serve.parser()._actions}
        assert set(app["args"]) <= known and app["args"]["root"].startswith("s3://")
        assert [d["name"] for d in app["deployments"]] == [serve.OpenAIServer.name]


def test_rayservice_pods_keep_fetched_steps_in_their_cache_on_the_clusters_image():
    docs = list(yaml.safe_load_all(RAYSERVICE.read_text()))
    env = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    cluster = next(d for d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    images = {c["image"] for d in yaml.safe_load_all((REPO / "cluster/kuberay/raycluster-objectstore.yaml").read_text())
              if d["kind"] == "RayCluster" for g in [d["spec"]["headGroupSpec"], *d["spec"]["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["image"] in images
            assert "lmforge-serve-env" in {r.get("configMapRef", {}).get("name") for r in container["envFrom"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert "emptyDir" in mounts[env["LMFORGE_CACHE"]]
            assert any(p["containerPort"] == 8000 for p in container["ports"])


def test_build_app_refuses_unknown_args_naming_them():
    with pytest.raises(serve.UserError, match="args: unknown num_gpus"):
        serve.build_app({"root": "/nowhere", "num_gpus": 1})
