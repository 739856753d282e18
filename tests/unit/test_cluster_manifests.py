"""Contract tests of cluster/: every manifest parses, every `python -m pipelines.run|submit`
command in the manifests and in cluster/README.md composes with the project's Hydra config and
passes validation, its paths.root lies on the shared volume the manifests mount, and the pieces
that name each other (RayJob -> RayCluster, CronJob -> ConfigMap, images) agree."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.validate import validate
from tests.conftest import REPO, compose_config

CLUSTER = REPO / "cluster"
COMMAND = re.compile(r"python -m pipelines\.(run|submit)\b([^\n;&|]*)")


def documents() -> dict[str, list]:
    """Every YAML document under cluster/, by file; a ConfigMap's *.yaml entries are parsed in place."""
    found = {}
    for path in sorted(CLUSTER.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for doc in docs:
            if doc.get("kind") == "ConfigMap":
                data = doc.get("data", {})
                data.update({key: yaml.safe_load(text) for key, text in data.items() if key.endswith(".yaml")})
        found[str(path.relative_to(REPO))] = docs
    return found


def strings(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from strings(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from strings(value)
    elif isinstance(tree, str):
        yield tree


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, overrides) of every pipelines.run / pipelines.submit command."""
    found = []
    for where, docs in documents().items():
        for text in (s for doc in docs for s in strings(doc)):
            found += [(where, m.group(1), shlex.split(m.group(2))) for m in COMMAND.finditer(text)]
    blocks = re.findall(r"^```bash\n(.*?)^```", (CLUSTER / "README.md").read_text(), re.M | re.S)
    for line in "".join(blocks).replace("\\\n", " ").splitlines():
        found += [("cluster/README.md", m.group(1), shlex.split(m.group(2))) for m in COMMAND.finditer(line)]
    return found


def mount_paths() -> set[str]:
    """Container paths of the shared artifact volume: KubeRay volumeMounts and `ray up` docker -v."""
    paths = set()
    for docs in documents().values():
        for doc in docs:
            for text in strings(doc):
                paths.update(re.findall(r"-v \S+:(/\S+)", text))
            paths.update(m["mountPath"] for mounts in find_key(doc, "volumeMounts") for m in mounts
                         if m["mountPath"] != "/dev/shm")
    return paths


def find_key(tree, key: str):
    if isinstance(tree, dict):
        for k, value in tree.items():
            if k == key:
                yield value
            yield from find_key(value, key)
    elif isinstance(tree, list):
        for value in tree:
            yield from find_key(value, key)


def by_kind(kind: str) -> list[dict]:
    """Kubernetes objects of one kind, also those inside ConfigMaps (a RayJob template)."""
    return [obj for docs in documents().values() for doc in docs for obj in [doc, *find_objects(doc)]
            if obj.get("kind") == kind]


def find_objects(tree):
    for value in (tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else ()):
        if isinstance(value, dict) and {"apiVersion", "kind", "metadata"} <= set(value):
            yield value
        yield from find_objects(value)


def test_every_manifest_parses_and_names_its_kind():
    found = documents()
    assert {"cluster/ray-cluster.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
            "cluster/kuberay/schedule.yaml"} <= set(found)
    for where, docs in found.items():
        assert docs, where
        if where.startswith("cluster/kuberay/"):
            assert all(doc.get("apiVersion") and doc.get("kind") for doc in docs), where


COMMANDS = commands()


def test_manifests_and_readme_have_commands():
    where = {w for w, _, _ in COMMANDS}
    assert {"cluster/kuberay/rayjob.yaml", "cluster/kuberay/schedule.yaml", "cluster/README.md"} <= where
    assert {module for _, module, _ in COMMANDS} == {"run", "submit"}


@pytest.mark.parametrize("where,module,args", COMMANDS, ids=[f"{w}:{m}:{i}" for i, (w, m, _) in enumerate(COMMANDS)])
def test_command_composes_and_validates_with_a_root_on_the_shared_volume(where, module, args):
    overrides = [a for a in args if not a.startswith("--")]  # pipelines.submit's own flags
    cfg = compose_config(overrides)
    validate(cfg)
    assert any(o.startswith("+experiment=") for o in overrides), f"{where}: names no experiment"
    if "://" in cfg.paths.root:  # an object-store root: the nodes share no volume (raycluster-objectstore.yaml)
        assert cfg.paths.root.split("://")[0] in ("s3", "gs", "hdfs", "abfs", "file"), f"{where}: {cfg.paths.root}"
        return
    root = Path(cfg.paths.root)
    assert root.is_absolute(), f"{where}: paths.root {root} is not absolute"
    assert any(root.is_relative_to(m) for m in mount_paths()), f"{where}: paths.root {root} is on no shared mount"


def test_rayjobs_target_a_raycluster_and_every_pod_mounts_its_artifact_storage():
    """A RayCluster with a shared root mounts the ReadWriteMany claim on every pod; one whose root
    is an object store mounts, on every pod, a local volume at its $LMFORGE_CACHE instead."""
    clusters = {c["metadata"]["name"]: c for c in by_kind("RayCluster")}
    assert len(clusters) == 2
    for job in by_kind("RayJob"):
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] in clusters
    claims = {doc["metadata"]["name"] for doc in by_kind("PersistentVolumeClaim")
              if "ReadWriteMany" in doc["spec"]["accessModes"]}
    env = {doc["metadata"]["name"]: doc["data"] for doc in by_kind("ConfigMap")}
    for cluster in clusters.values():
        groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
        for group in groups:
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            for container in group["template"]["spec"]["containers"]:
                settings = next(env[ref["configMapRef"]["name"]] for ref in container["envFrom"] if "configMapRef" in ref)
                mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if m["mountPath"] != "/dev/shm"}
                if "://" in settings["LMFORGE_ROOT"]:
                    assert list(mounts) == [settings["LMFORGE_CACHE"]] and "emptyDir" in mounts[settings["LMFORGE_CACHE"]]
                else:
                    assert [v["persistentVolumeClaim"]["claimName"] for v in mounts.values()] == [*claims]
                    assert Path(settings["LMFORGE_ROOT"]).is_relative_to(*mounts)
        gpus = [g for g in cluster["spec"]["workerGroupSpecs"]
                if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpus and gpus[0]["maxReplicas"] > 0


def test_schedule_creates_the_rayjob_it_ships_with_the_rights_it_needs():
    cronjob = by_kind("CronJob")[0]
    assert len(cronjob["spec"]["schedule"].split()) == 5
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    mounted = {v["configMap"]["name"] for v in pod["volumes"]}
    templates = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] in mounted]
    assert templates and "rayjob.yaml" in templates[0]["data"]
    assert "kubectl create -f /rayjob/rayjob.yaml" in " ".join(pod["containers"][0]["args"])
    account = pod["serviceAccountName"]
    binding = next(b for b in by_kind("RoleBinding") if b["subjects"][0]["name"] == account)
    role = next(r for r in by_kind("Role") if r["metadata"]["name"] == binding["roleRef"]["name"])
    assert any("rayjobs" in rule["resources"] and "create" in rule["verbs"] for rule in role["rules"])


def test_ray_up_config_has_a_head_and_a_gpu_worker_group_on_the_same_image():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` checks first: Ray's schema, with its defaults
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any(t["max_workers"] > 0 and t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers.values())
    images = {config["docker"]["image"]} | {c["image"] for cluster in by_kind("RayCluster")
                                            for group in find_key(cluster, "containers") for c in group}
    assert len(images) == 1, images


def test_dockerfile_has_cpu_and_cuda_variants_and_installs_as_the_readme_does():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG DEVICE=cpu$", dockerfile, re.M)
    assert {"base-cpu", "base-cuda"} <= set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M))
    assert re.search(r"^FROM base-\$\{DEVICE\}$", dockerfile, re.M)
    readme_pin = re.search(r"pip install -c constraints.txt (torch==\S+) -e '\.\[dev\]'", (REPO / "README.md").read_text())
    assert f'ARG TORCH_SPEC="{readme_pin.group(1)}"' in dockerfile
    assert re.search(r"pip install .*-c constraints.txt \"\$\{TORCH_SPEC\}\" -e '\.\[dev\]'", dockerfile)
