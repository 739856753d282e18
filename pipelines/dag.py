"""The pipeline graph: which steps exist, what each reads and what enters its fingerprint, and the plan.

Each step is declared once, below, with its inputs (some only under a setting: `Read(step, when)`)
and its fingerprint rule (an `identity` function beside it). A step's fingerprint hashes (name,
version, its own resolved config section without placement fields, upstream fingerprints); its
output lives at `<root>/<step>/<fingerprint>/`. The steps of an experiment are the enabled ones, in
a topological order (among the steps ready at a point, the one declared first); `plan` says per
step *run* or *cached* and, for *run*, why.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from conf.schema import (Config, EnsembleStepConfig, EvaluateStepConfig, FinetuneStepConfig, PretrainStepConfig,
                         TrainConfig)
from pipelines import artifacts
from pipelines.redaction import redact, redact_text
from tasks import (decontaminate, ensemble, evaluate, finetune, ingest, pretrain, sources, taskdata, tokenize,
                   tokenizer_files, units)
from tasks.common import UserError


def identity(section: Any) -> Any:
    """The part of a config section that decides a step's result: placement fields dropped."""
    if dataclasses.is_dataclass(section):
        return {f.name: identity(getattr(section, f.name)) for f in dataclasses.fields(section)
                if not f.metadata.get("placement")}
    if isinstance(section, (list, tuple)):
        return [identity(item) for item in section]
    if isinstance(section, dict):
        return {key: identity(value) for key, value in section.items()}
    return section


@dataclass(frozen=True)
class Read:
    """An input a step reads only under some settings: `when(cfg, section)`, section being the step's own."""
    step: str
    when: Callable[[Config, Any], bool]


def always(cfg: Config) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    name: str
    """Unique in a plan: 'finetune', or 'finetune.lora' for a branch."""
    version: int
    fn: Callable
    section: Callable[[Config], Any]
    deps: tuple[Union[str, Read], ...] = ()
    """The steps it reads; `Read` entries only where their condition holds (`wired` resolves them to names)."""
    train: Optional[Callable[[Any], TrainConfig]] = None
    """For training steps: where the workers' settings are; they run as a Ray Train job."""
    identity: Callable[[Any], Any] = identity
    kind: str = ""
    """The step function's name where `name` carries a branch: fingerprints, output directories
    and the input names a step sees use it, so a branch shares its cache with a single run."""
    members: tuple[str, ...] = ()
    """Steps of one kind read as a group (an ensemble's evaluate branches): planned before this one,
    their fingerprints join its identity and their directories its section's `member_dirs`."""
    enabled: Callable[[Config], bool] = always
    """Whether an experiment has this step at all."""

    @property
    def base(self) -> str:
        return self.kind or self.name


# ingest: the corpus, by name, size and bytes.
def ingest_identity(section) -> dict:
    """The corpus files by name, size and bytes (remote ones by modification time); a language-identification model file by its bytes."""
    view = {**identity(section), "sources_digest": ingest.sources_digest(section)}
    if section.filters.language_model and section.filters.languages:
        view["language_model_digest"] = sources.content_digest(section.filters.language_model,
                                                               "data.filters.language_model")
    return view


INGEST = Step("ingest", 1, ingest.run, lambda c: c.data, identity=ingest_identity)


# tokenize: reads the decontaminate step's verdict with decontaminate.remove.
def tokenize_identity(section) -> dict:
    """A reused tokenizer (tokenizer.path, a placement field) counts by its files' bytes, and the
    training settings it makes irrelevant drop out."""
    view = identity(section)
    if section.path:
        for unused in tokenize.TRAINING_FIELDS:
            view.pop(unused)
        view["tokenizer_digest"] = tokenizer_files.files_digest(section.path)
    return view


def removes_overlap(cfg: Config, section=None) -> bool:
    """decontaminate.remove: the corpus documents that overlap the task's sets are left out of tokenization."""
    return cfg.decontaminate.enabled and cfg.decontaminate.remove


TOKENIZE = Step("tokenize", 1, tokenize.run, lambda c: c.tokenizer, ("ingest", Read("decontaminate", removes_overlap)),
                identity=tokenize_identity)
PRETRAIN = Step("pretrain", 3, pretrain.train_worker, lambda c: PretrainStepConfig(c.model, c.pretrain), ("tokenize",),
                train=lambda s: s.pretrain)


# taskdata: the user's task files by their bytes.
def taskdata_identity(section) -> dict:
    """The user's task files count by their bytes: a file edited in place reruns taskdata and all after it."""
    view = identity(section)
    if section.builtin is None:
        view["file_digests"] = {key: sources.content_digest(getattr(section, key), f"task.{key}")
                                for key in ("train_path", "val_path", "test_path") if getattr(section, key)}
    return view


TASKDATA = Step("taskdata", 1, taskdata.run, lambda c: c.task, identity=taskdata_identity)
DECONTAMINATE = Step("decontaminate", 1, decontaminate.run, lambda c: c.decontaminate, ("ingest", "taskdata"),
                     enabled=lambda c: c.decontaminate.enabled)
"""Without decontaminate.remove a leaf: its metrics and report.json."""


# finetune (and the control, and each branch): options of unused methods drop out.
def finetune_identity(section: FinetuneStepConfig) -> dict:
    """Options of the finetuning methods not in use do not change the result; an augmentation lexicon
    counts by its bytes."""
    view = identity(section)
    for method in finetune.FINETUNE_METHODS:
        if method != section.finetune.method:
            view["finetune"].pop(method, None)
    lexicon = section.finetune.augment.lexicon_path
    if lexicon and section.finetune.augment.copies:
        view["lexicon_digest"] = sources.content_digest(lexicon, "finetune.augment.lexicon_path")
    return view


def replays(cfg: Config, section: FinetuneStepConfig) -> bool:
    """A fine-tuning with replay (finetune.replay_fraction) reads the tokenize step's pretraining rows."""
    return section.finetune.replay_fraction > 0


def has_control(cfg: Config, section=None) -> bool:
    """eval.no_pretraining (classification): a control step, which every evaluation reads."""
    return cfg.eval.no_pretraining and cfg.task.kind == "classification"


def control_section(c: Config) -> FinetuneStepConfig:
    """The no-pretraining control: the (first) fine-tuning's settings and budget, every weight
    trained from random initialisation."""
    ft = next(iter(c.finetunes.values())) if c.finetunes else c.finetune
    return FinetuneStepConfig(dataclasses.replace(ft, init="random", method="full", replay_fraction=0.0), c.task)


CONTROL = Step("control", 2, finetune.train_worker, control_section, ("pretrain", "taskdata"),
               train=lambda s: s.finetune, identity=finetune_identity, enabled=has_control)


# evaluate: which branches an ensemble combines drops out.
def evaluate_identity(section: EvaluateStepConfig) -> dict:
    """Which branches an ensemble step combines does not change any one branch's evaluation."""
    view = identity(section)
    view["eval"].pop("ensemble", None)
    return view


def single(cfg: Config) -> bool:
    """One fine-tuning (the `finetune` section): no branches in `finetunes`."""
    return not cfg.finetunes


FINETUNE = Step("finetune", 3, finetune.train_worker, lambda c: FinetuneStepConfig(c.finetune, c.task),
                ("pretrain", "taskdata", Read("tokenize", replays)), train=lambda s: s.finetune,
                identity=finetune_identity, enabled=single)
EVALUATE = Step("evaluate", 2, evaluate.run, lambda c: EvaluateStepConfig(c.eval, c.task, c.finetune.max_length),
                ("tokenize", "pretrain", "taskdata", "finetune", Read("control", has_control)),
                identity=evaluate_identity, enabled=single)

STEPS = (INGEST, TOKENIZE, PRETRAIN, TASKDATA, DECONTAMINATE, CONTROL, FINETUNE, EVALUATE)
"""Declaration order, which breaks ties in the plan; branches (`finetunes`) and the ensemble follow."""
VERSIONS = {step.name: step.version for step in STEPS}
"""Raised when a step's results change with the same config: pretrain 2 and finetune 3 (control 2)
export model cards and generation defaults, with the tokenizer's BOS id in config.json."""


def branch_steps(name: str, ft) -> tuple[Step, Step]:
    """finetune.<name> and evaluate.<name> for one entry of `finetunes`: the single steps, reading `ft`."""
    tune = dataclasses.replace(FINETUNE, name=f"finetune.{name}", section=lambda c: FinetuneStepConfig(ft, c.task),
                               kind="finetune", enabled=always)
    judge = dataclasses.replace(EVALUATE, name=f"evaluate.{name}", kind="evaluate", enabled=always,
                                section=lambda c: EvaluateStepConfig(c.eval, c.task, ft.max_length),
                                deps=tuple(tune.name if dep == "finetune" else dep for dep in EVALUATE.deps))
    return tune, judge


def ensemble_step(branches: list[str]) -> Step:
    """The evaluated branches (eval.ensemble) as one model: mean label probabilities, or decoding on
    mean token log-probabilities."""
    def section(c: Config) -> EnsembleStepConfig:
        return EnsembleStepConfig(c.eval, c.task, max_length=min(c.finetunes[b].max_length for b in branches))

    # version 2: classification ensembles report intervals and paired differences with majority and TF-IDF
    return Step("ensemble", 2, ensemble.run, section, ("taskdata",),
                members=tuple(f"evaluate.{name}" for name in branches), enabled=lambda c: bool(c.eval.ensemble))


def declared(cfg: Config) -> tuple[Step, ...]:
    """Every step an experiment could have: the fixed ones, then per branch of `finetunes` a
    finetune/evaluate pair, then the ensemble of some of them."""
    branches = tuple(step for name, ft in cfg.finetunes.items() for step in branch_steps(name, ft))
    return (*STEPS, *branches, *((ensemble_step(cfg.eval.ensemble),) if cfg.finetunes else ()))


def wired(step: Step, cfg: Config) -> Step:
    """The step with the inputs it reads under `cfg`: each `Read` kept, as a name, where its condition holds."""
    section = step.section(cfg)
    deps = tuple(dep if isinstance(dep, str) else dep.step for dep in step.deps
                 if isinstance(dep, str) or dep.when(cfg, section))
    return dataclasses.replace(step, deps=deps)


def topological(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """The steps, each after every step it reads; of those ready at a point, the one declared first."""
    names = {step.name for step in steps}
    for step in steps:
        if missing := sorted(set(step.deps + step.members) - names):
            raise ValueError(f"step {step.name} reads {missing}, which are not steps of this experiment")
    placed: dict[str, Step] = {}
    while len(placed) < len(steps):
        ready = [s for s in steps if s.name not in placed and set(s.deps + s.members) <= set(placed)]
        if not ready:
            raise ValueError(f"steps read each other in a circle: {sorted(names - set(placed))}")
        placed[ready[0].name] = ready[0]
    return tuple(placed.values())


def steps_for(cfg: Config) -> tuple[Step, ...]:
    """The graph of an experiment: the enabled steps, wired and in topological order; with `until`,
    only the steps that one needs."""
    steps = topological(tuple(wired(step, cfg) for step in declared(cfg) if step.enabled(cfg)))
    return needed_for(steps, cfg.until) if cfg.until else steps


def needed_for(steps: tuple[Step, ...], until: str) -> tuple[Step, ...]:
    """The steps named by `until` (a name, or the base name of branches) and everything they read."""
    by_name = {step.name: step for step in steps}
    wanted = [step.name for step in steps if until in (step.name, step.base)]
    if not wanted:
        raise UserError(f"until: '{until}' is not a step of this experiment; one of {', '.join(by_name)}")
    keep: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name not in keep:
            keep.add(name)
            wanted.extend((*by_name[name].deps, *by_name[name].members))
    return tuple(step for step in steps if step.name in keep)


def fingerprint(step: Step, view: Any, upstream: dict[str, str]) -> str:
    payload = json.dumps({"step": step.base, "version": step.version, "config": view, "upstream": upstream},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass
class PlannedStep:
    step: Step
    section: Any
    view: dict
    fingerprint: str
    upstream: dict[str, str]
    out_dir: Path
    status: str  # "run" or "cached"
    reason: str
    in_store: bool = False
    """Cached only in the step store (paths.store): downloaded when the executor reaches it."""


def plan(cfg: Config, root: Path, steps=None, store=None) -> list[PlannedStep]:
    """Per step: cached (here, or in the step store `store`) or run, and why."""
    planned: dict[str, PlannedStep] = {}
    for step in steps or steps_for(cfg):
        section = step.section(cfg)
        view = step.identity(section)
        if step.members:
            section = dataclasses.replace(section, member_dirs={
                m.split(".", 1)[-1]: str(planned[m].out_dir) for m in step.members}, member_inputs={
                m.split(".", 1)[-1]: {dep: str(artifacts.step_dir(root, dep, fp)) for dep, fp in planned[m].upstream.items()}
                for m in step.members})
            view["members"] = {m: planned[m].fingerprint for m in step.members}
        upstream = {planned[dep].step.base: planned[dep].fingerprint for dep in step.deps}
        fp = fingerprint(step, view, upstream)
        out_dir = artifacts.step_dir(root, step.base, fp)
        manifest = artifacts.read_manifest(out_dir)
        problem = artifacts.damage(out_dir, manifest) if manifest else None
        in_store = not (manifest and not problem) and store is not None and store.manifest(step.base, fp) is not None
        if manifest and not problem:
            status, reason = "cached", "same config and inputs"
        elif in_store:
            status, reason = "cached", "same config and inputs, in the step store"
        elif problem:
            status, reason = "run", f"the cached result is damaged ({problem}); recomputing"
        else:
            status, reason = "run", why_run(root, step, view, upstream, out_dir)
        planned[step.name] = PlannedStep(step, section, view, fp, upstream, out_dir, status, reason, in_store)
    return list(planned.values())


def why_run(root: Path, step: Step, view: dict, upstream: dict, out_dir: Path) -> str:
    if out_dir.exists():
        return "an earlier attempt did not finish"
    if artifacts.finished_training(artifacts.partial_dir(root, step.base, out_dir.name)):
        return "an earlier attempt finished training but was not published; publishing it"
    if (artifacts.partial_dir(root, step.base, out_dir.name) / "checkpoints" / "latest").exists():
        return "an earlier attempt stopped; continuing from its last checkpoint"
    if done := units.progress(artifacts.partial_dir(root, step.base, out_dir.name)):
        return f"an earlier attempt stopped; {done[0]} of {done[1]} work units done, continuing"
    previous = artifacts.previous_manifests(root, step.base)
    if not previous:
        return "no earlier run"
    # Explain against the closest earlier run (fewest differences; the newest among equals).
    view = redact(view)  # manifests hold the redacted config, and reasons are printed
    last = min(previous, key=lambda m: len(diff(m.get("config", {}), view)) +
               sum(m.get("upstream", {}).get(d) != fp for d, fp in upstream.items()))
    changes = [f"{key}: the file changed" if "digest" in key else f"{key}: {old!r} -> {new!r}"
               for key, old, new in diff(last.get("config", {}), view)]
    changed_inputs = sorted(dep for dep, fp in upstream.items() if last.get("upstream", {}).get(dep) != fp)
    reasons = []
    if changes:
        reasons.append("config changed (" + "; ".join(changes[:3]) + (" ..." if len(changes) > 3 else "") + ")")
    if changed_inputs:
        reasons.append("upstream changed: " + ", ".join(changed_inputs))
    return "; ".join(reasons) or "step code version changed"


def diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [(prefix, old, new)]


DATA_PRODUCTS = {"ingest": "corpus shards", "tokenize": "token arrays", "taskdata": "task splits"}
"""Steps whose results are data sets (the others make models and reports)."""


def datasets_read(item: PlannedStep, root: Path) -> list[dict]:
    """What a planned step reads, as MLflow datasets (name, digest, source, context): the data
    products of its upstream steps (digest: their fingerprint) and, for ingest and taskdata, the
    user's files (digest: what the fingerprint holds of them)."""
    context = ("training" if item.step.train else "evaluation" if item.step.base == "evaluate"
               else "preprocessing")
    read = [{"name": product, "digest": item.upstream[dep], "source": str(artifacts.step_dir(root, dep, item.upstream[dep])),
             "context": context} for dep, product in DATA_PRODUCTS.items() if dep in item.upstream]
    if item.step.base == "ingest":
        corpus = [*item.section.paths, *(f"builtin:{name}" for name in item.section.builtin)]
        read.append({"name": "corpus", "digest": item.view["sources_digest"], "context": "source",
                     "source": redact_text(json.dumps(corpus))})
    for key, digest in item.view.get("file_digests", {}).items() if item.step.base == "taskdata" else ():
        read.append({"name": f"task {key.removesuffix('_path')}", "digest": digest, "context": "source",
                     "source": redact_text(getattr(item.section, key))})
    return read
