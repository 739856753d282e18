"""Which models a finished pipeline run offers for generation, read from the artifact root: the
run summaries (`<root>/runs/<run id>.json`) and the published steps' directories and manifests.
Shared by `pipelines.chat` and `pipelines.serve`.

A run offers its pretrained model (id `pretrain`) and each fine-tuned branch by its step name
(`finetune` for one branch, `finetune.<branch>` for an experiment with `finetunes:`): a LoRA
adapter on the run's pretrained model, or a full model (`model/`, and `merged/` for LoRA from
random initialisation, whose base weights were never saved). A classification head cannot
generate, nor can prefix tuning's adapters be served here; both are listed as skipped with the reason.

    summary = find_run(root, run_id=None, experiment=None)    # default: the newest finished run
    specs, skipped = run_models(root, summary)
    spec = pick_branch(specs, skipped, branch, summary)        # for the terminal chat
    spec = directory_model(path)                              # a model or adapter directory
"""
from __future__ import annotations

import json
from pathlib import Path

from pipelines import artifacts, status
from tasks.common import UserError
from tasks.generation import ModelSpec
from tasks.models import OBJECTIVE_FILE, saved_config

PRETRAIN, FINETUNE = "pretrain", "finetune"


def local_root(root: str) -> Path:
    """--root as a local folder of runs (chat and serving load weights from disk)."""
    if "://" in root:
        raise UserError(f"--root {root}: chat and serve read a local folder of runs; copy the run's steps "
                        f"here first (python -m pipelines.store) or give --model-dir")
    path = Path(root).resolve()
    if not path.is_dir():
        raise UserError(f"--root {path} is not a folder of runs (no such folder); give the paths.root your runs "
                        f"used, or set $LMFORGE_ROOT")
    return path


def find_run(root: Path, run_id: str | None = None, experiment: str | None = None) -> dict:
    """A finished run's summary: the one named, else the newest (of `experiment`, when given)."""
    summaries = status.load_summaries(root)
    if run_id:
        if run_id not in summaries:
            raise UserError(f"--run-id {run_id}: no finished run with that id under {root} "
                            f"(python -m pipelines.status --root {root} lists them)")
        return summaries[run_id]
    found = [s for s in summaries.values() if experiment is None or s.get("experiment") == experiment]
    if not found:
        which = f"of experiment '{experiment}' " if experiment else ""
        option = "--experiment" if experiment else "--root"
        raise UserError(f"{option}: no finished run {which}under {root}; run `python -m pipelines.run "
                        f"+experiment=NAME` first, or give another {option}")
    return max(found, key=lambda s: s["written_at"])


def run_models(root: Path, summary: dict) -> tuple[list[ModelSpec], dict[str, str]]:
    """The run's models that can generate, and {step name: why not} for its fine-tuned ones that cannot."""
    steps = {s["name"]: s for s in summary["steps"]}
    if PRETRAIN not in steps:
        raise UserError(f"--run-id {summary['run_id']}: this run has no pretrain step, so no model; choose another run")
    run_id = summary["run_id"]
    pretrain_dir = artifacts.step_dir(root, PRETRAIN, steps[PRETRAIN]["fingerprint"]) / "model"
    specs = [ModelSpec(PRETRAIN, pretrain_dir, None, run_id, PRETRAIN, steps[PRETRAIN]["fingerprint"], chat=False)]
    skipped = {}
    for name, step in steps.items():
        if name.split(".")[0] != FINETUNE:
            continue
        spec_or_reason = finetune_model(root, name, step["fingerprint"], run_id)
        if isinstance(spec_or_reason, str):
            skipped[name] = spec_or_reason
        else:
            specs.append(spec_or_reason)
    missing = [s for s in specs if not s.path.is_dir()]
    if missing:
        raise UserError(f"--run-id {run_id}: the model of step {missing[0].step} is missing ({missing[0].path}); "
                        f"was it removed by pipelines.gc? Rerun the experiment or choose another run")
    return specs, skipped


def finetune_model(root: Path, name: str, fingerprint: str, run_id: str) -> ModelSpec | str:
    """A finetune step's model as a ModelSpec, or why it cannot generate."""
    step_dir = artifacts.step_dir(root, FINETUNE, fingerprint)
    manifest = artifacts.read_manifest(step_dir) or {}
    config = manifest.get("config", {})
    finetune, task = config.get("finetune", {}), config.get("task", {})
    objective = json.loads((step_dir / OBJECTIVE_FILE).read_text()) if (step_dir / OBJECTIVE_FILE).exists() else {}
    if objective.get("objective") == "classifier":
        return "a classifier (classification head): it scores labels and cannot generate text"
    chat = task.get("kind") == "chat"
    make = lambda path, base=None: ModelSpec(name, path, base, run_id, name, fingerprint, chat)
    if (step_dir / "model").is_dir():
        return make(step_dir / "model")
    if finetune.get("method") == "prefix":
        return "prefix tuning: its trained KV prefix is not served here (load it with PeftModel and generate)"
    if not (step_dir / "adapter").is_dir():
        return f"incomplete: {step_dir} has neither model/ nor adapter/"
    if finetune.get("init") == "random":  # the adapter's base is a random initialisation that was never saved
        return make(step_dir / "merged")
    base_fingerprint = manifest.get("upstream", {}).get(PRETRAIN)
    if not base_fingerprint:
        return f"its manifest ({step_dir}) names no pretrain step to apply the adapter to"
    return make(step_dir / "adapter", artifacts.step_dir(root, PRETRAIN, base_fingerprint) / "model")


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


def selected_models(args) -> tuple[dict | None, list[ModelSpec], dict[str, str]]:
    """(run summary or None, the models that can generate, {step: why not} for those that cannot)."""
    if args.model_dir is not None:
        return None, [directory_model(args.model_dir)], {}
    root = local_root(args.root)
    summary = find_run(root, args.run_id, args.experiment)
    return summary, *run_models(root, summary)
