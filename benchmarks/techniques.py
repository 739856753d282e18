"""Each optimisation / robustness technique on and off for the quickstart task (issue 8), measured by
the pipeline's own evaluate step: task metric, the metric on perturbed inputs, training time,
model size on disk and inference tokens/s, with int8 and pruned + int8 copies of the base model.

Runs `+experiment=techniques` (five LoRA branches from the quickstart's pretrained model, an
ensemble of the first five, three more branches sweeping FGM's epsilon, every evaluation with robustness and int8), then the evaluate step twice
more on the base branch's inputs, int8 without and with 50% magnitude pruning, and prints one Markdown
table. Ingest, tokenize and pretrain are shared with the quickstart through --root. The table is
built from the plan the pipeline printed (saved in <root>/benchmarks/techniques.log), so
`--from-log` prints the rows of whatever steps have finished.

    .venv/bin/python benchmarks/techniques.py [--root lmforge_runs] [--from-log FILE] [extra Hydra overrides]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PERTURBATIONS = ("typos", "casing", "deleted_words")
BRANCHES = {"base": "LoRA, techniques off", "regularised": "+ weight decay 0.1, dropout 0.1 (attn, hidden, LoRA), label smoothing 0.1",
            "early_stop": "+ early stopping (val loss, patience 2, every 25 steps)", "augmented": "+ augmentation (1 copy per record)",
            "adversarial": "+ FGM adversarial training (epsilon 0.5)"}
FGM_SWEEP = {"fgm_eps0p1": "+ FGM, epsilon 0.1", "fgm_eps0p03": "+ FGM, epsilon 0.03", "fgm_eps0p01": "+ FGM, epsilon 0.01"}
PLAN_LINE = re.compile(r"^  (\S+)\s+(?:run|cached)\s+([0-9a-f]{16})\s", re.MULTILINE)


def run_pipeline(root: Path, overrides: list[str], log_path: Path) -> None:
    """One pipeline run, its output shown and kept in log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.run", f"paths.root={root}", *overrides], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
    if proc.wait():
        raise SystemExit(f"the pipeline failed (exit {proc.returncode}); see {log_path}")


def step_dirs(root: Path, log_text: str) -> dict[str, Path]:
    """Step name -> output directory, from the plan a pipeline run printed."""
    return {name: root / name.split(".")[0] / fp for name, fp in PLAN_LINE.findall(log_text)}


def manifest(directory: Path | None) -> dict:
    from pipelines import artifacts

    return (artifacts.read_manifest(directory) or {}) if directory else {}


def int8_evaluation(root: Path, base_eval: dict, overrides: list[str], sparsity: float) -> dict:
    """The evaluate step again on evaluate.base's inputs, with int8 after magnitude pruning at `sparsity`
    (no robustness): float and int8 tokens/s measured in one process, taking turns."""
    from conf.compose import compose_config
    from conf.schema import EvaluateStepConfig, QuantizeConfig, RobustnessConfig
    from tasks import evaluate
    from tasks.common import TaskContext

    cfg = compose_config(["+experiment=techniques", *overrides])
    eval_cfg = dataclasses.replace(cfg.eval, robustness=RobustnessConfig(), ensemble=[],
                                   quantize=QuantizeConfig(enabled=True, sparsity=sparsity))
    out_dir = root / "benchmarks" / f"int8_sparsity{sparsity:g}"
    done = out_dir / "metrics.json"  # kept with its inputs: a second --from-log does not evaluate again
    if done.exists() and json.loads(done.read_text())["inputs"] == base_eval["inputs"]:
        return json.loads(done.read_text())["metrics"]
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    section = EvaluateStepConfig(eval_cfg, cfg.task, cfg.finetunes["base"].max_length)
    metrics = evaluate.run(section, base_eval["inputs"], out_dir, TaskContext("evaluate.pruned"))
    done.write_text(json.dumps({"inputs": base_eval["inputs"], "metrics": metrics}))
    return metrics


def row(label: str, scores: dict, prefix: str, tuned: dict, mb, tokens_per_s) -> list:
    """Training cost twice: wall seconds of the whole step (start-up and validation included, and
    whatever else the machine did meanwhile) and the median tokens/s of its log windows, which a
    passing load hardly moves."""
    robust = [scores.get(f"robust_{p}_accuracy") for p in PERTURBATIONS] if prefix == "finetuned" else [None] * 3
    return [label, scores.get(f"{prefix}_accuracy"), scores.get(f"{prefix}_macro_f1"), *robust,
            tuned.get("train_seconds"), tuned.get("tokens_per_s"), mb, tokens_per_s]


def table(steps: dict, int8: dict, pruned: dict) -> list[list]:
    """One row per technique; '-' where a step has no result (yet)."""
    rows = []
    for branch, label in {**BRANCHES, **FGM_SWEEP}.items():
        tuned, scores = steps[f"finetune.{branch}"], steps[f"evaluate.{branch}"]
        extra = {"early_stop": f" (best step {tuned.get('best_step')}, stopped at {tuned.get('last_step')})",
                 "augmented": f" ({tuned.get('augmented_examples')} augmented records)"}.get(branch, "")
        rows.append(row(label + extra, scores, "finetuned", tuned, scores.get("served_mb"),
                        scores.get("served_tokens_per_s")))
    members = [(steps[f"finetune.{m}"], steps[f"evaluate.{m}"]) for m in BRANCHES]
    complete = all(tuned and scores for tuned, scores in members)
    ensemble = steps.get("ensemble", {})
    rows.append(["ensemble of the first five (mean label probabilities)", ensemble.get("ensemble_accuracy"),
                 ensemble.get("ensemble_macro_f1"), None, None, None,
                 sum(t["train_seconds"] for t, _ in members) if complete else None, None,
                 sum(s["served_mb"] for _, s in members) if complete else None,
                 1 / sum(1 / s["served_tokens_per_s"] for _, s in members) if complete else None])
    for label, scores in (("base, int8 (dynamic quantisation of linear layers)", int8),
                          ("base, 50% magnitude pruning + int8", pruned)):
        rows.append(row(label, scores, "int8", {}, scores.get("int8_mb"), scores.get("int8_tokens_per_s")))
    return rows


def show(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if isinstance(value, float) and value >= 100 else (
        f"{value:.3f}" if isinstance(value, float) else str(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="lmforge_runs", help="artifact root shared with the quickstart")
    parser.add_argument("--from-log", help="a pipeline log of +experiment=techniques: run nothing, print its rows")
    args, overrides = parser.parse_known_args()
    root = Path(args.root).resolve()
    log_path = Path(args.from_log) if args.from_log else root / "benchmarks" / "techniques.log"
    if not args.from_log:
        run_pipeline(root, ["+experiment=techniques", *overrides], log_path)
    dirs = step_dirs(root, log_path.read_text())
    found = {name: manifest(directory) for name, directory in dirs.items()}
    steps = {name: found.get(name, {}).get("metrics", {}) for name in
             [f"{kind}.{b}" for b in [*BRANCHES, *FGM_SWEEP] for kind in ("finetune", "evaluate")] + ["ensemble"]}
    int8, pruned = ((int8_evaluation(root, found["evaluate.base"], overrides, sparsity) if found.get("evaluate.base")
                     else {}) for sparsity in (0.0, 0.5))
    header = ["technique", "accuracy", "macro-F1", *(f"acc. {p.replace('_', ' ')}" for p in PERTURBATIONS),
              "training s (wall)", "training tokens/s (median)", "model MB", "inference tokens/s"]
    print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for values in table(steps, int8, pruned):
        print("| " + " | ".join(show(v) for v in values) + " |")


if __name__ == "__main__":
    main()
