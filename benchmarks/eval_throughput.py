"""Label-likelihood scoring in test examples/s: packed (each prompt once, all candidates after it
under one attention mask, examples batched) against the per-example reference (one batch of
prompt + candidate per label), measured in the same run on the quickstart's task and model shape.

The quickstart's corpus, tokenizer and task records are made here (ingest, tokenize and taskdata
in this process); the model is the quickstart's architecture at random initialisation (speed does
not depend on the weights). The reference is measured before and after the packed method and
averaged, because these machines are noisy. Also printed: how far the two methods' scores are
apart on the examples whose input neither cuts, and how often their predictions agree on all.

    python benchmarks/eval_throughput.py [--examples 150] [--batch 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from conf.compose import compose_config  # noqa: E402
from conf.schema import Config  # noqa: E402
from tasks import ingest, labelscore, pretrain, taskdata, tokenize  # noqa: E402
from tasks.common import TaskContext  # noqa: E402

def quickstart(root: Path) -> Config:
    return compose_config(["+experiment=quickstart", f"paths.root={root}"])


def prepare(cfg: Config, root: Path) -> tuple[Path, Path]:
    """The quickstart's tokenizer and task splits, made in this process."""
    dirs = {name: root / name for name in ("ingest", "tokenize", "taskdata")}
    for directory in dirs.values():
        directory.mkdir()
    ingest.run(cfg.data, {}, dirs["ingest"], TaskContext("ingest"))
    tokenize.run(cfg.tokenizer, {"ingest": dirs["ingest"]}, dirs["tokenize"], TaskContext("tokenize"))
    taskdata.run(cfg.task, {}, dirs["taskdata"], TaskContext("taskdata"))
    return dirs["tokenize"], dirs["taskdata"]


def timed(score) -> tuple[list[list[float]], float]:
    started = time.perf_counter()
    scores = score()
    return scores, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16, help="examples per packed forward pass")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = quickstart(Path(tmp))
        tokenize_dir, taskdata_dir = prepare(cfg, Path(tmp))
        meta = json.loads((tokenize_dir / "meta.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(tokenize_dir / "tokenizer")
        records = taskdata.load_split(taskdata_dir, "test")[: args.examples]
        labels = taskdata.load_labels(taskdata_dir)
    torch.manual_seed(0)
    model = pretrain.build_model(cfg.model, meta["vocab_size"], meta["pad_id"], meta["eos_id"]).eval()
    length = cfg.finetune.max_length
    reference = lambda: [labelscore.label_log_likelihoods(model, tokenizer, r, labels, cfg.task, length) for r in records]
    packed = lambda: labelscore.packed_label_log_likelihoods(model, tokenizer, records, labels, cfg.task, length,
                                                             batch_size=args.batch)
    expected, before = timed(reference)
    got, packed_s = timed(packed)
    _, after = timed(reference)
    reference_s = (before + after) / 2
    longest = max(len(taskdata.encode_target(tokenizer, " " + label)) for label in labels)
    prompt = lambda r: taskdata.encode_prompt(tokenizer, taskdata.render({**r, "label": labels[0]}, cfg.task)[:3],
                                              cfg.task.kind, 10**6, longest)
    whole = [i for i, r in enumerate(records) if len(prompt(r)) + longest <= length]
    gap = float(np.abs(np.asarray(got)[whole] - np.asarray(expected)[whole]).max()) if whole else float("nan")
    agree = np.mean(np.argmax(got, axis=1) == np.argmax(expected, axis=1))
    print(f"quickstart task: {len(records)} test examples, {len(labels)} labels, max_length {length}, "
          f"model {cfg.model.hidden_size}x{cfg.model.num_layers} (random init), {args.threads} threads")
    print(f"reference (per example) : {len(records) / reference_s:7.1f} examples/s "
          f"(before {len(records) / before:.1f}, after {len(records) / after:.1f})")
    print(f"packed (batch {args.batch:>3})      : {len(records) / packed_s:7.1f} examples/s")
    print(f"ratio packed/reference  : {reference_s / packed_s:.2f}")
    print(f"largest score difference: {gap:.2e} on the {len(whole)} examples no method cuts; "
          f"predictions agree on {agree:.1%} of all")


if __name__ == "__main__":
    main()
