"""Model quality on real data (issue 15): the pipeline pretrains on a book (War and Peace, from
../shared/datasets) and fine-tunes classification heads on TREC (6 coarse classes, official test set)
and CR (customer-review polarity, a seeded 80/20 split), with `+experiment=quality`: full fine-tuning
and LoRA from the pretrained model, and the full fine-tuning from random initialisation (the
no-pretraining control step). For each task it prints the fine-tuned results with their 95% bootstrap intervals beside
majority, untuned, zero-shot and TF-IDF + logistic regression, the paired differences, and the
held-out perplexities beside the unigram and Kneser-Ney trigram baselines.

Ingest, tokenize and pretrain run once and are shared by both tasks (the same --root). With
--reference, a bare Hugging Face loop (benchmarks/reference_classifier.py: no Ray, DeepSpeed or
lmforge code) fine-tunes the same pretrained model, and the same architecture from random weights,
on the same files with the full branch's learning rate, batch and epochs, in the same run: if it
learns and the pipeline's step does not, the step has a defect.

    .venv/bin/python benchmarks/quality.py [--root lmforge_runs] [extra Hydra overrides] [--tasks cr trec] [--reference]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.report import with_interval
from tasks import baselines

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATASETS = REPO.parent / "shared" / "datasets"
BRANCHES = {"full": "full fine-tuning, head", "lora": "LoRA + head"}
BASELINES = ("majority", "tfidf_logreg", "untuned", "zero_shot", "no_pretraining")


def trec_records(path: Path) -> list[dict]:
    """`COARSE:fine question` lines (the train file is Latin-1) -> {text, label} with the coarse label."""
    records = []
    for line in path.read_bytes().decode("latin-1").splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            records.append({"text": text.strip(), "label": label.split(":")[0]})
    return records


def cr_split(directory: Path, seed: int = 0, test_share: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Non-blank lines of custrev.pos/.neg, a seeded 80/20 split (the shared README's reference split)."""
    records = [{"text": line.strip(), "label": label}
               for label in ("pos", "neg")
               for line in (directory / f"custrev.{label}").read_text(encoding="utf-8", errors="replace").splitlines()
               if line.strip()]
    order = np.random.default_rng(seed).permutation(len(records))
    cut = int(round(len(records) * (1 - test_share)))
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]


def write_task(out_dir: Path, name: str, train: list[dict], test: list[dict]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / f"{name}_train.jsonl", out_dir / f"{name}_test.jsonl"
    for path, records in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def prepare(out_dir: Path) -> dict[str, tuple[Path, Path]]:
    return {"trec": write_task(out_dir, "trec", trec_records(DATASETS / "trec" / "train_5500.label"),
                               trec_records(DATASETS / "trec" / "TREC_10.label")),
            "cr": write_task(out_dir, "cr", *cr_split(DATASETS / "cr"))}


def write_task_texts(out_dir: Path, tasks: dict[str, tuple[Path, Path]]) -> Path:
    """The input texts of every task's train split (never a test record), one a line: the unlabeled
    in-domain text of task-adaptive pretraining (Gururangan et al., 2020)."""
    from benchmarks.reference_classifier import read_jsonl

    path = out_dir / "task_train_texts.txt"
    path.write_text("".join(r["text"] + "\n" for train, _ in tasks.values() for r in read_jsonl(train)))
    return path


def corpus_overrides(tasks: dict[str, tuple[Path, Path]], out_dir: Path, adaptive: float) -> list[str]:
    """The book alone, or with the tasks' train texts at mixing weight `adaptive` (one corpus for all tasks,
    so the pretraining is still shared)."""
    book = DATASETS / "war_and_peace.txt"
    if not adaptive:
        return [f"data.paths=[{book}]"]
    return [f"data.paths=[{book},{write_task_texts(out_dir, tasks)}]", f"data.weights=[1,{adaptive:g}]"]


def run_task(root: Path, task: str, paths: tuple[Path, Path], extra: list[str]) -> dict:
    """One pipeline run; returns {step name: metrics} from its summary JSON."""
    log_path = root / "benchmarks" / f"quality_{task}.log"
    command = [sys.executable, "-m", "pipelines.run", "+experiment=quality", f"paths.root={root}",
               f"experiment_name=quality_{task}", "task=jsonl", f"task.train_path={paths[0]}", f"task.test_path={paths[1]}",
               *extra]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        summary = None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if line.startswith("summary JSON:"):
                summary = Path(line.split(":", 1)[1].strip())
        if proc.wait() or summary is None:
            raise SystemExit(f"the {task} run failed (exit {proc.returncode}); see {log_path}")
    steps = json.loads(summary.read_text())["steps"]
    print(f"[quality] {task}: {time.monotonic() - started:.0f} s wall", flush=True)
    return {s["name"]: {**s["metrics"], "_status": s["status"], "_seconds": s["seconds"], "_out_dir": s["out_dir"]}
            for s in steps}


def print_task(task: str, steps: dict) -> None:
    first = steps[f"evaluate.{next(iter(BRANCHES))}"]
    pretrain = steps["pretrain"]
    print(f"\n### {task}: test accuracy and macro-F1 with 95% bootstrap intervals\n")
    print("| model | accuracy | macro-F1 | finetune s | vs TF-IDF (paired) |")
    print("|---|---|---|---|---|")
    for name in BASELINES:
        seconds = f"{steps['control'].get('train_seconds', 0):.0f}" if name == "no_pretraining" and "control" in steps else ""
        print(f"| {name} | {with_interval(first, f'{name}_accuracy')} | {with_interval(first, f'{name}_macro_f1')} | {seconds} | |")
    for branch, title in BRANCHES.items():
        scores, tuned = steps[f"evaluate.{branch}"], steps[f"finetune.{branch}"]
        low, high = scores["finetuned_vs_tfidf_logreg_low"], scores["finetuned_vs_tfidf_logreg_high"]
        verdict = baselines.verdict(low, high)
        print(f"| {title} | {with_interval(scores, 'finetuned_accuracy')} | {with_interval(scores, 'finetuned_macro_f1')} | "
              f"{tuned.get('train_seconds', float('nan')):.0f} | {scores['finetuned_vs_tfidf_logreg_delta']:+.3f} "
              f"[{low:+.3f}, {high:+.3f}] {verdict} |")
    if "ensemble_vs_tfidf_logreg_low" in steps.get("ensemble", {}):  # eval.ensemble=[full,lora]
        scores = steps["ensemble"]
        low, high = scores["ensemble_vs_tfidf_logreg_low"], scores["ensemble_vs_tfidf_logreg_high"]
        print(f"| ensemble of {' + '.join(BRANCHES)} | {with_interval(scores, 'ensemble_accuracy')} | "
              f"{with_interval(scores, 'ensemble_macro_f1')} | | {scores['ensemble_vs_tfidf_logreg_delta']:+.3f} "
              f"[{low:+.3f}, {high:+.3f}] {baselines.verdict(low, high)} |")
    ppl = {k[4:]: v for k, v in first.items() if k.startswith("ppl_") and k != "ppl_finetuned"}
    print("\nheld-out perplexity: " + ", ".join(f"{k} {v:.1f}" for k, v in ppl.items())
          + "; after fine-tuning: " + ", ".join(f"{b} {steps[f'evaluate.{b}']['ppl_finetuned']:.1f}" for b in BRANCHES))
    print(f"pretraining: {pretrain.get('train_seconds', float('nan')):.0f} s, {pretrain.get('num_parameters', 0):,} "
          f"parameters ({pretrain['_status']})")


def print_reference(root: Path, task: str, paths: tuple[Path, Path], steps: dict) -> None:
    """The bare loop on the pretrained model of this run, and from random weights: accuracy per epoch."""
    from benchmarks.reference_classifier import read_jsonl, reference_loop

    full = json.loads((Path(steps["finetune.full"]["_out_dir"]) / "_manifest.json").read_text())["config"]["finetune"]
    model_dir = Path(steps["pretrain"]["_out_dir"]) / "model"
    train, test = read_jsonl(paths[0]), read_jsonl(paths[1])
    print(f"\nreference loop ({task}; lr {full['lr']}, batch {full['global_batch_size']}, "
          f"{full['max_epochs']:g} epochs, {full['max_length']} tokens): test accuracy after each epoch")
    for init in ("pretrained", "random"):
        accuracies = reference_loop(model_dir, train, test, lr=full["lr"], epochs=int(full["max_epochs"]),
                                    batch_size=full["global_batch_size"], max_tokens=full["max_length"], init=init)
        print(f"  {init:<10} " + " / ".join(f"{a:.3f}" for a in accuracies), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="lmforge_runs")
    parser.add_argument("--tasks", nargs="+", default=["cr", "trec"], choices=["cr", "trec"])
    parser.add_argument("--reference", action="store_true", help="also run the bare Hugging Face loop")
    parser.add_argument("--adaptive", type=float, default=0.0, metavar="WEIGHT",
                        help="task-adaptive pretraining: add the tasks' train texts to the corpus at this mixing weight")
    args, extra = parser.parse_known_args()
    root = Path(args.root).resolve()
    tasks = prepare(root / "benchmarks" / "quality_data")
    extra = corpus_overrides(tasks, root / "benchmarks" / "quality_data", args.adaptive) + extra
    results = {task: run_task(root, task, tasks[task], extra) for task in args.tasks}
    for task, steps in results.items():
        print_task(task, steps)
        if args.reference:
            print_reference(root, task, tasks[task], steps)


if __name__ == "__main__":
    main()
