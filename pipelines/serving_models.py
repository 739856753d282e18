"""Which models a finished pipeline run offers for generation, read from the artifact root: the
run summaries (`<root>/runs/<run id>.json`) and the published steps' manifests and directories.
Shared by `pipelines.chat` and `pipelines.serve`. The root is a local folder, or an object store
(s3://..., gs://..., file:///...: paths.root of a run whose nodes share only the store), whose
steps are read from their manifests and fetched onto the node that loads them (`fetched`).

A run offers its pretrained model (id `pretrain`) and each fine-tuned branch by its step name
(`finetune` for one branch, `finetune.<branch>` for an experiment with `finetunes:`): a LoRA
adapter on the run's pretrained model, or a full model (`model/`, and `merged/` for LoRA from
random initialisation, whose base weights were never saved). A classification head cannot
generate, nor can prefix tuning's adapters be served here; both are listed as skipped with the reason.

    summary, specs, skipped, source = selected_models(args)   # --root/--run-id/--experiment/--model-dir
    specs = fetched(specs, source)                             # where they are loaded (a no-op for a local root)
    spec = pick_branch(specs, skipped, branch, summary)        # for the terminal chat
    after_run(cfg, summary)                                    # pipelines.run: the serve command, or serving
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from pipelines import artifacts, status, store
from tasks.common import UserError
from tasks.generation import ModelSpec
from tasks.models import OBJECTIVE_FILE, saved_config

PRETRAIN, FINETUNE = "pretrain", "finetune"


class PublishedSteps:
    """The published steps under a root: a local folder, or with `step_store` an object store whose
    steps are judged by their manifests (which list every file) without downloading weights."""

    def __init__(self, root: Path, step_store: store.Store | None = None):
        self.root, self.store, self.manifests = root, step_store, {}

    def manifest(self, step: str, fingerprint: str) -> dict | None:
        if (step, fingerprint) not in self.manifests:
            self.manifests[step, fingerprint] = (
                self.store.manifest(step, fingerprint) if self.store
                else artifacts.read_manifest(artifacts.step_dir(self.root, step, fingerprint)))
        return self.manifests[step, fingerprint]

    def has(self, step: str, fingerprint: str, name: str) -> bool:
        """Whether the step holds the file or folder `name`."""
        if self.store is None:
            return (artifacts.step_dir(self.root, step, fingerprint) / name).exists()
        files = (self.manifest(step, fingerprint) or {}).get("files", {})
        return name in files or any(f.startswith(f"{name}/") for f in files)

    def read_json(self, step: str, fingerprint: str, name: str) -> dict:
        if self.store is not None:
            return self.store.get_json(f"{step}/{fingerprint}/{name}") or {}
        path = artifacts.step_dir(self.root, step, fingerprint) / name
        return json.loads(path.read_text()) if path.exists() else {}

    def where(self, step: str, fingerprint: str) -> str:
        if self.store is not None:
            return self.store.location(step, fingerprint)
        return str(artifacts.step_dir(self.root, step, fingerprint))


@dataclass(frozen=True)
class StoreSource:
    """A run whose root is an object store: its steps, downloaded on the node that loads the models."""

    uri: str
    driver_root: str
    """The working copy the specs' paths were made under (the selecting machine's)."""
    steps: tuple[tuple[str, str], ...]
    """(step, fingerprint) of every directory the specs name."""


def open_root(root: str) -> PublishedSteps:
    """--root as published steps: a local folder of runs, or an object store (its working copy here
    is $LMFORGE_CACHE, else <temp dir>/lmforge-cache, as for the pipeline)."""
    if store.is_uri(root):
        return PublishedSteps(store.cache_root(""), store.open_store(root, "--root"))
    path = Path(root).resolve()
    if not path.is_dir():
        raise UserError(f"--root {path} is not a folder of runs (no such folder); give the paths.root your runs "
                        f"used, or set $LMFORGE_ROOT")
    return PublishedSteps(path)


def find_run(steps: PublishedSteps, run_id: str | None = None, experiment: str | None = None) -> dict:
    """A finished run's summary: the one named, else the newest (of `experiment`, when given)."""
    summaries = status.load_summaries(steps.root) if steps.store is None else {  # the store's runs only: a
        s.get("run_id", ""): {**s, "written_at": at} for s, at in steps.store.summaries()}  # cache may serve several
    where = steps.store.uri if steps.store else steps.root
    if run_id:
        if run_id not in summaries:
            raise UserError(f"--run-id {run_id}: no finished run with that id under {where} "
                            f"(python -m pipelines.status --root {where} lists them)")
        return summaries[run_id]
    found = [s for s in summaries.values() if experiment is None or s.get("experiment") == experiment]
    if not found:
        which = f"of experiment '{experiment}' " if experiment else ""
        option = "--experiment" if experiment else "--root"
        raise UserError(f"{option}: no finished run {which}under {where}; run `python -m pipelines.run "
                        f"+experiment=NAME` first, or give another {option}")
    return max(found, key=lambda s: s["written_at"])


def run_models(steps: PublishedSteps, summary: dict) -> tuple[list[ModelSpec], dict[str, str]]:
    """The run's models that can generate, and {step name: why not} for its fine-tuned ones that cannot."""
    by_name = {s["name"]: s for s in summary["steps"]}
    if PRETRAIN not in by_name:
        raise UserError(f"--run-id {summary['run_id']}: this run has no pretrain step, so no model; choose another run")
    run_id, pretrain_fp = summary["run_id"], by_name[PRETRAIN]["fingerprint"]
    pretrain_dir = artifacts.step_dir(steps.root, PRETRAIN, pretrain_fp) / "model"
    specs = [ModelSpec(PRETRAIN, pretrain_dir, None, run_id, PRETRAIN, pretrain_fp, chat=False)]
    skipped = {}
    for name, step in by_name.items():
        if name.split(".")[0] != FINETUNE:
            continue
        spec_or_reason = finetune_model(steps, name, step["fingerprint"], run_id)
        if isinstance(spec_or_reason, str):
            skipped[name] = spec_or_reason
        else:
            specs.append(spec_or_reason)
    missing = [s for s in specs if not steps.has(*step_of(steps.root, s.path))]
    if missing:
        raise UserError(f"--run-id {run_id}: the model of step {missing[0].step} is missing "
                        f"({steps.where(*step_of(steps.root, missing[0].path)[:2])}); was it removed by "
                        f"pipelines.gc? Rerun the experiment or choose another run")
    return specs, skipped


def step_of(root: Path, path: Path) -> tuple[str, str, str]:
    """(step, fingerprint, folder) of a model directory below the root."""
    step, fingerprint, folder = Path(path).relative_to(root).parts[:3]
    return step, fingerprint, folder


def finetune_model(steps: PublishedSteps, name: str, fingerprint: str, run_id: str) -> ModelSpec | str:
    """A finetune step's model as a ModelSpec, or why it cannot generate."""
    step_dir = artifacts.step_dir(steps.root, FINETUNE, fingerprint)
    manifest = steps.manifest(FINETUNE, fingerprint) or {}
    config = manifest.get("config", {})
    finetune, task = config.get("finetune", {}), config.get("task", {})
    if steps.read_json(FINETUNE, fingerprint, OBJECTIVE_FILE).get("objective") == "classifier":
        return "a classifier (classification head): it scores labels and cannot generate text"
    chat = task.get("kind") == "chat"
    make = lambda path, base=None: ModelSpec(name, path, base, run_id, name, fingerprint, chat)
    has = lambda folder: steps.has(FINETUNE, fingerprint, folder)
    if has("model"):
        return make(step_dir / "model")
    if finetune.get("method") == "prefix":
        return "prefix tuning: its trained KV prefix is not served here (load it with PeftModel and generate)"
    if not has("adapter"):
        return f"incomplete: {steps.where(FINETUNE, fingerprint)} has neither model/ nor adapter/"
    if finetune.get("init") == "random":  # the adapter's base is a random initialisation that was never saved
        return make(step_dir / "merged")
    base_fingerprint = manifest.get("upstream", {}).get(PRETRAIN)
    if not base_fingerprint:
        return f"its manifest ({steps.where(FINETUNE, fingerprint)}) names no pretrain step to apply the adapter to"
    return make(step_dir / "adapter", artifacts.step_dir(steps.root, PRETRAIN, base_fingerprint) / "model")


def store_source(steps: PublishedSteps, specs: list[ModelSpec]) -> StoreSource | None:
    """What a node must fetch to load the specs (None: the root is a local folder, nothing to fetch)."""
    if steps.store is None:
        return None
    paths = [p for s in specs for p in (s.path, s.base_path) if p is not None]
    wanted = sorted({step_of(steps.root, p)[:2] for p in paths})
    return StoreSource(steps.store.uri, str(steps.root), tuple(wanted))


def fetched(specs: list[ModelSpec], source: StoreSource | None, say=print) -> list[ModelSpec]:
    """The specs as directories on this node: for an object-store root, their steps downloaded into this
    node's working copy (unless it holds them already, checked against the stored manifests)."""
    if source is None:
        return specs
    step_store, node_root = store.open_store(source.uri, "--root"), store.cache_root("")
    for step, fingerprint in source.steps:
        store.fetch_steps(step_store, node_root, {step: fingerprint}, say)
    here = lambda path: path and node_root / Path(path).relative_to(source.driver_root)
    return [dataclasses.replace(s, path=here(s.path), base_path=here(s.base_path)) for s in specs]


def pick_branch(specs: list[ModelSpec], skipped: dict[str, str], branch: str | None, summary: dict) -> ModelSpec:
    """The model to chat with: --branch (a fine-tuned branch, or `pretrain`), else the run's only
    fine-tuned model that can generate, else (a run without fine-tuning) the pretrained model."""
    by_id = {s.id: s for s in specs}
    names = {s.id.removeprefix(f"{FINETUNE}."): s.id for s in specs}
    run = f"run {summary['run_id']} ({summary.get('experiment', '?')})"
    if branch is not None:
        step = names.get(branch) or (branch if branch in by_id or branch in skipped else f"{FINETUNE}.{branch}")
        if step in by_id:
            return by_id[step]
        if step in skipped:
            raise UserError(f"--branch {branch}: the model of {run} is {skipped[step]}; choose another --branch "
                            f"({', '.join(sorted(names))})")
        raise UserError(f"--branch {branch}: {run} has no such branch; choose one of {', '.join(sorted(names))}")
    tuned = [s for s in specs if s.step != PRETRAIN]
    if len(tuned) == 1:
        return tuned[0]
    if len(tuned) > 1:
        raise UserError(f"--branch: {run} has several fine-tuned models; choose one of "
                        f"{', '.join(sorted(n for n in names if n != PRETRAIN))} (or pretrain)")
    if skipped:
        step, reason = next(iter(skipped.items()))
        raise UserError(f"--branch: the fine-tuned model of {run} ({step}) is {reason}; "
                        f"chat with its pretrained model with --branch pretrain")
    return by_id[PRETRAIN]


def directory_model(path: Path) -> ModelSpec:
    """A model directory given by hand: a full model (config.json), or a PEFT adapter (adapter_config.json,
    applied to the model its config names)."""
    path = Path(path).resolve()
    if (path / "adapter_config.json").exists():
        base = Path(json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
        if not (base / "config.json").exists():
            raise UserError(f"--model-dir {path}: the adapter's base model ({base}) is not a model directory here")
        return ModelSpec(path.name, path, base)
    architectures = saved_config(path).get("architectures")
    if architectures is None:
        raise UserError(f"--model-dir {path}: not a model directory (no config.json or adapter_config.json)")
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"--model-dir {path}: a classifier (classification head) cannot generate text; "
                        f"give a causal language model (a pretrain step's model/, a finetune step's merged/)")
    return ModelSpec(path.name, path)


def add_selection_arguments(parser) -> None:
    """The options that choose a run or a model directory (pipelines.chat and pipelines.serve)."""
    import os

    parser.add_argument("--root", default=os.environ.get("LMFORGE_ROOT", "lmforge_runs"),
                        help="paths.root of the runs (default $LMFORGE_ROOT, else ./lmforge_runs)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-id", help="a finished run (default: the newest finished run under --root)")
    which.add_argument("--experiment", help="the newest finished run of this experiment_name")
    which.add_argument("--model-dir", type=Path, help="a model or LoRA adapter directory instead of a run")


def selected_models(args) -> tuple[dict | None, list[ModelSpec], dict[str, str], StoreSource | None]:
    """(run summary or None, the models that can generate, {step: why not} for those that cannot, and
    for an object-store root what to fetch where they are loaded: `fetched(specs, source)`)."""
    if args.model_dir is not None:
        return None, [directory_model(args.model_dir)], {}, None
    steps = open_root(args.root)
    summary = find_run(steps, args.run_id, args.experiment)
    specs, skipped = run_models(steps, summary)
    return summary, specs, skipped, store_source(steps, specs)


def serve_arguments(cfg, summary: dict) -> list[str]:
    """`python -m pipelines.serve`'s arguments for a finished run of `cfg` (a conf.schema.Config): its
    root as the run gave it (an object-store URI stays one), its run id, and the `serve` section."""
    root = cfg.paths.root if store.is_uri(cfg.paths.root) else str(Path(cfg.paths.root).resolve())
    argv = ["--root", root, "--run-id", summary["run_id"], "--port", str(cfg.serve.port)]
    if cfg.serve.host != "127.0.0.1":
        argv += ["--host", cfg.serve.host]
    if cfg.serve.num_cpus is not None:
        argv += ["--num-cpus", str(cfg.serve.num_cpus)]
    if cfg.serve.max_batch_size != 8:
        argv += ["--max-batch-size", str(cfg.serve.max_batch_size)]
    if cfg.ray.address:
        argv += ["--address", cfg.ray.address]
    return argv


def after_run(cfg, summary: dict) -> None:
    """After a run's summary (pipelines.run): the command that serves its models, or with
    serve.enabled=true the server itself, until Ctrl-C. Nothing for a dry run or a run without a model."""
    if cfg.dry_run or PRETRAIN not in {s["name"] for s in summary.get("steps", [])}:
        return
    argv = serve_arguments(cfg, summary)
    command = f"python -m pipelines.serve {shlex.join(argv)}"
    if not cfg.serve.enabled:
        print(f"serve it with:     {command}")
        return
    if sweeping():
        print(f"serve.enabled: a sweep (-m) goes on to its next run instead of serving; serve this one with: {command}")
        return
    from pipelines import serve  # Ray Serve and FastAPI are imported only when a run serves

    code = serve.main(argv)
    if code:
        raise SystemExit(code)  # serve printed its one-line error


def sweeping() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
