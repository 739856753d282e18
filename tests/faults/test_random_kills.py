"""The driver (`pipelines.run`) killed with SIGKILL at random moments, again and again, until a
run gets through: each relaunch redoes only unfinished work (steps, checkpoints), and the final
outputs are identical to those of a run that was never interrupted: the same fingerprints, the
same bytes in every result file, the same losses at every logged step."""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import time

from pipelines import artifacts
from tests.conftest import REPO
from tests.e2e.test_crash_resume import wait_for_step

STEPS = ["ingest", "tokenize", "pretrain", "taskdata", "decontaminate", "finetune", "evaluate"]
# Pretraining long enough that a killed driver's Ray workers, which go on for a few seconds
# (about 40 tiny steps here), stop before they finish; checkpoints every 10 steps.
OVERRIDES = ["ray.num_cpus=2", "pretrain.max_steps=120", "pretrain.checkpoint_every=10", "pretrain.eval_every=40",
             "finetune.max_steps=8", "finetune.checkpoint_every=2"]
TIMING = {"seconds", "train_seconds", "tokens_per_s", "served_tokens_per_s", "mfu", "memory_gb", "time",
          "elapsed_s", "eta_s", "samples_per_s", "tokens_per_second", "step_seconds",
          "units_reused"}  # ingest work units an earlier, killed attempt finished
NUM_KILLS = 3  # the first mid-pretraining, two at random moments; each relaunch costs a Ray start


def launch(root, output=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "pipelines.run", "+experiment=tiny", f"paths.root={root}",
                             *OVERRIDES], cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True)


def status_listing(root) -> str:
    return subprocess.run([sys.executable, "-m", "pipelines.status", "--root", str(root)], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout


def summary_of(output: str) -> dict:
    return json.loads(open(re.search(r"summary JSON:\s+(\S+)", output).group(1)).read())


def without_timing(record):
    if isinstance(record, dict):
        return {k: without_timing(v) for k, v in record.items() if k not in TIMING}
    return record


def normalised(record):
    """Timings dropped; PEFT keeps `target_modules` as a set, so its saved order varies by process."""
    record = without_timing(record)
    if isinstance(record, dict) and isinstance(record.get("target_modules"), list):
        record["target_modules"] = sorted(record["target_modules"])
    return {k: normalised(v) for k, v in record.items()} if isinstance(record, dict) else record


def result_files(root, summary) -> dict[str, dict]:
    """Per step, its result files: SHA-256 by path, with the root path normalised in text files
    (an adapter's config names its base model's directory) and timings dropped from logs and reports."""
    out = {}
    for step in summary["steps"]:
        directory = artifacts.step_dir(root, step["name"], step["fingerprint"])
        files = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != artifacts.MANIFEST):
            name = str(path.relative_to(directory))
            if path.suffix == ".jsonl" and "log" in path.name:
                files[name] = [without_timing(json.loads(line)) for line in path.read_text().splitlines() if line]
            elif path.suffix == ".json":
                files[name] = normalised(json.loads(path.read_text().replace(str(root), "<root>")))
            elif path.suffix in (".md", ".txt", ".jsonl"):
                files[name] = path.read_text().replace(str(root), "<root>")
            else:
                files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        out[step["name"]] = files
    return out


def test_random_sigkills_of_the_driver_change_nothing_in_the_results(tmp_path, fault_table):
    reference_root, killed_root = tmp_path / "uninterrupted", tmp_path / "killed"
    # The uninterrupted run goes on beside the killed ones, in its own root and its own Ray: the
    # results are deterministic, so sharing the machine changes only how long each takes.
    reference_log = tmp_path / "uninterrupted.log"  # a file: nobody reads a pipe until the end
    reference = launch(reference_root, reference_log.open("w"))

    rng = random.Random(7)
    # The first kill lands mid-pretraining, between two checkpoints; the others at random times.
    # A relaunch skips what is done, so later kills come sooner: within its first 30 s, while it starts
    # Ray, plans, takes locks or runs the next steps.
    triggers = [("pretrain step", rng.randint(15, 40))] + [("seconds", rng.uniform(4, 30))
                                                          for _ in range(NUM_KILLS - 1)]
    kills, outputs = [], []
    for kind, value in triggers:
        proc = launch(killed_root)
        if kind == "pretrain step":
            wait_for_step(killed_root, proc, value)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=value)
        if proc.poll() is not None:  # it finished before the kill
            outputs.append(proc.communicate()[0])
            break
        proc.send_signal(signal.SIGKILL)
        outputs.append(proc.communicate()[0])
        done = [s for s in STEPS if any((killed_root / s).glob("[!.]*"))]
        kills.append(f"{kind} {value:.0f} ({len(done)} steps done)")
        time.sleep(2)  # the embedded Ray's processes notice their driver is gone
    states = [line.split()[2] for line in status_listing(killed_root).splitlines()[1:]]
    assert "interrupted" in states and "running" not in states, states  # a SIGKILLed launch is not running
    proc = launch(killed_root)
    output = proc.communicate(timeout=1200)[0]
    assert proc.returncode == 0, output[-3000:]
    outputs.append(output)
    final = summary_of(output)
    reference.wait(timeout=1200)
    reference_output = reference_log.read_text()
    assert reference.returncode == 0, reference_output[-3000:]
    expected = summary_of(reference_output)

    assert [(s["name"], s["fingerprint"]) for s in final["steps"]] == \
           [(s["name"], s["fingerprint"]) for s in expected["steps"]]
    assert result_files(killed_root, final) == result_files(reference_root, expected)
    for got, want in zip(final["steps"], expected["steps"]):
        assert without_timing(got["metrics"]) == without_timing(want["metrics"]), got["name"]
    pretrain_lines = [[line for line in out.splitlines() if "pretrain" in line or "resumed" in line] for out in outputs]
    # After the first kill, pretraining goes on from its last checkpoint, or, if the killed
    # driver's workers finished it meanwhile, their result is published without training again.
    continued = ("continuing from its last checkpoint", "finished training but was not published")
    assert kills and any(re.search(rf"pretrain\s+run\s+\w+\s+.*{c}", outputs[1]) for c in continued), pretrain_lines
    leftovers = [p for pattern in ("*/.staging-*", "*/.partial-*", "*/.lock-*") for p in killed_root.glob(pattern)]
    assert not leftovers, (leftovers, [out[-2000:] for out in outputs])
    starts = [re.findall(r"\] (\w+): running", out) for out in outputs]
    restarted = sorted({s for s in STEPS if sum(s in launched for launched in starts) > 1})
    resumed = [m for out in outputs for m in re.findall(r"resumed from the checkpoint at step \d+", out)]
    adopted = sum(continued[1] in out for out in outputs)
    fault_table(f"driver SIGKILL at {len(kills)} random moments (seed 7)", "SIGKILL at " + ", ".join(kills),
                f"killed launches shown as interrupted by pipelines.status; launch {len(outputs)} finished; "
                f"results byte-identical to an uninterrupted run",
                f"steps started again: {', '.join(restarted) or 'none'}; {len(resumed)} resumes from a checkpoint, "
                f"{adopted} finished trainings published without rerunning",
                "0 (same fingerprints, files, losses)")
