"""lm-evaluation-harness as a client of the exported models (issue 20): a local lm-eval task built from
the pipeline's own test split scores `merged/` and the pretrained model + `peft=adapter/` with lm-eval's
`hf` model, and its per-example label log-likelihoods and accuracy are compared with what the evaluate
step computed for the same model (label_scores.json, report.json).

The task is a multiple-choice task over the record's prompt, exactly as fine-tuning rendered it, with
each label followed by the tokenizer's EOS as the choices (lmforge scores a label with its EOS): lm-eval's
`acc` then reads the same sums as the evaluate step's `finetuned` row. Only models that score labels by
likelihood (`finetune.objective=lm`) can be read this way: a classification head is not a language model.

lm-eval is not a dependency of lmforge: `pip install lm-eval` first. Nothing is downloaded (local files,
offline mode). Without --root the script first runs the tiny experiment with `finetune.objective=lm`
into a temporary root (about 3 minutes on 2 cores).

    .venv/bin/python benchmarks/lm_eval_client.py [--root ROOT_OF_A_FINISHED_RUN]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TASK = "lmforge_test_split"


def finished_run(root: Path | None) -> dict[str, Path]:
    """The step directories of the latest finished run under root (running the tiny experiment first
    when no root is given)."""
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="lmforge-lmeval-"))
        done = subprocess.run([sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}",
                               "ray.num_cpus=2", "finetune.objective=lm"], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
    from pipelines.status import load_summaries

    summaries = load_summaries(root)
    if not summaries:
        sys.exit(f"--root {root}: no finished run (runs/*.json)")
    steps = {s["name"]: Path(s["out_dir"]) for s in max(summaries.values(), key=lambda s: s["written_at"])["steps"]}
    if "finetune" not in steps or not (steps["finetune"] / "adapter").is_dir():
        sys.exit(f"--root {root}: the latest run has no LoRA fine-tuning (finetune/<fp>/adapter)")
    if json.loads((steps["finetune"] / "objective.json").read_text()).get("objective") != "lm":
        sys.exit(f"--root {root}: the fine-tuned model has a classification head; lm-eval reads language models "
                 "(rerun with finetune.objective=lm)")
    return steps


def write_task(steps: dict[str, Path], task_dir: Path) -> list[dict]:
    """The test split as lm-eval documents (prompt as fine-tuning encoded it, labels + EOS as choices) and
    a task YAML that reads them; returns the documents."""
    from conf.schema import TaskConfig
    from tasks import taskdata
    from tasks.tokenize import load_tokenizer

    manifest = json.loads((steps["evaluate"] / "_manifest.json").read_text())
    config = manifest["config"]
    tokenizer = load_tokenizer(steps["pretrain"] / "model")
    labels = json.loads((steps["evaluate"] / "label_scores.json").read_text())["labels"]
    task = TaskConfig(**{k: v for k, v in config["task"].items() if k in TaskConfig.__dataclass_fields__})
    max_length = config["max_length"]
    target_length = max(len(taskdata.encode_target(tokenizer, " " + label)) for label in labels)
    documents = []
    for record in taskdata.load_split(steps["taskdata"], "test"):
        head, body, tail, _ = taskdata.render(record, task)
        prompt_ids = taskdata.encode_prompt(tokenizer, (head, body, tail), task.kind, max_length, target_length)
        documents.append({"context": tokenizer.decode(prompt_ids), "gold": labels.index(record["label"]),
                          "choices": [f" {label}{tokenizer.eos_token}" for label in labels]})
    data = task_dir / "test.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in documents))
    (task_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_target: gold\ndoc_to_choice: choices\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    return documents


def lm_eval_scores(model_args: str, task_dir: Path) -> tuple[float, list[list[float]]]:
    """lm-eval's accuracy and each document's choice log-likelihoods (in document order)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"{model_args},dtype=float32,device=cpu", tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(task_dir)), batch_size=1,
                                  log_samples=True, num_fewshot=0)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK]["acc,none"], [[resp[0] for resp in s["filtered_resps"]] for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="a run root whose latest run fine-tuned with objective=lm")
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    steps = finished_run(args.root)
    ours = json.loads((steps["evaluate"] / "label_scores.json").read_text())["scores"]
    report = json.loads((steps["evaluate"] / "report.json").read_text())
    our_accuracy = report["task"]["scores"]["finetuned"]["accuracy"]
    with tempfile.TemporaryDirectory() as task_dir:
        documents = write_task(steps, Path(task_dir))
        base = steps["pretrain"] / "model"
        rows = {"merged/": f"pretrained={steps['finetune'] / 'merged'}",
                "model/ + peft=adapter/": f"pretrained={base},peft={steps['finetune'] / 'adapter'}"}
        print(f"{len(documents)} test documents; evaluate step: finetuned accuracy {our_accuracy:.3f}")
        print(f"{'lm-eval hf model':<26} {'acc':>6} {'largest log-likelihood difference':>36} {'same predictions':>17}")
        worst = 0.0
        for name, model_args in rows.items():
            accuracy, theirs = lm_eval_scores(model_args, Path(task_dir))
            difference = max(abs(a - b) for mine, them in zip(ours, theirs) for a, b in zip(mine, them))
            same = sum(max(range(len(m)), key=m.__getitem__) == max(range(len(t)), key=t.__getitem__)
                       for m, t in zip(ours, theirs))
            print(f"{name:<26} {accuracy:>6.3f} {difference:>36.2e} {same:>11}/{len(ours)}")
            worst = max(worst, difference, abs(accuracy - our_accuracy))
    sys.exit(0 if worst < 1e-3 else f"lm-eval disagrees with the evaluate step (largest difference {worst:.2e})")


if __name__ == "__main__":
    main()
