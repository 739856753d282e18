"""Submit the pipeline to a running Ray cluster through Ray's Job Submission API, print the job
id and follow its logs until it ends (exit 0 when it succeeded).

    python -m pipelines.submit +experiment=quickstart paths.root=/shared/lmforge [overrides]
    python -m pipelines.submit +experiment=quickstart paths.root=s3://bucket/lmforge   # nodes share no disk
    python -m pipelines.submit --no-follow +experiment=quickstart ...   # print the job id and return

The cluster is `ray.address=...` or $RAY_ADDRESS: the dashboard (`http://head:8265`) or any
address `ray.init` takes. The overrides are composed and validated here first, so a bad one
fails before anything is sent. The job runs `python -m pipelines.run` with the same overrides in
a copy of this project (Ray's `working_dir`), joined to the cluster through the RAY_ADDRESS the
job gets; $LMFORGE_ROOT, $LMFORGE_STORE and $MLFLOW_TRACKING_URI are passed on when set.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from conf.compose import compose_dict
from conf.schema import Config
from pipelines import artifacts
from pipelines.redaction import redact_text
from pipelines.validate import check_composed, validate
from tasks.common import UserError, first_line

REPO = Path(__file__).resolve().parent.parent
PASSED_ENV = ("LMFORGE_ROOT", "LMFORGE_STORE", "MLFLOW_TRACKING_URI")
# Not uploaded with the code (Ray also leaves out what .gitignore names).
EXCLUDES = [".venv", ".git", "lmforge_runs", "outputs", "__pycache__", "*.egg-info", ".pytest_cache",
            ".ruff_cache", ".hypothesis"]


def compose(overrides: list[str]) -> Config:
    """The typed config, composed from conf/ the way `pipelines.run` composes it, with its checks of the
    composed config (unknown keys, a switched method)."""
    composed, choices = compose_dict(overrides)
    check_composed(composed, choices)
    return OmegaConf.to_object(composed)


def check_submittable(cfg: Config) -> None:
    validate(cfg)
    if not (os.path.isabs(cfg.paths.root) or "://" in cfg.paths.root):
        raise UserError(f"paths.root: '{cfg.paths.root}' is relative, and a submitted job runs in a fresh copy of "
                        "the project; give an absolute path on storage every node mounts (paths.root=/shared/lmforge) "
                        "or an object store (paths.root=s3://bucket/lmforge)")


def entrypoint(overrides: list[str]) -> str:
    # Inside the job the driver joins its own cluster through the RAY_ADDRESS Ray sets for it;
    # the address this client used (often the dashboard URL) is not one `ray.init` takes.
    kept = [o for o in overrides if not o.lstrip("+~").startswith("ray.address=")]
    return shlex.join(["python", "-m", "pipelines.run", *kept])


def runtime_env() -> dict:
    env_vars = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    env_vars[artifacts.CODE_VERSION_ENV] = artifacts.code_version()  # the copy the job runs has no .git
    return {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env_vars}


def submit(cfg: Config, overrides: list[str], address: str) -> tuple[object, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint(overrides), runtime_env=runtime_env(),
                               metadata={"lmforge.experiment": cfg.experiment_name})
    return client, job_id


def follow(client, job_id: str) -> str:
    """Print the job's logs as they come; returns its final status."""
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    while not (status := client.get_job_status(job_id)).is_terminal():  # the log stream can end first
        time.sleep(1)
    return str(status.value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-follow", action="store_true", help="print the job id and return at once")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for pipelines.run (+experiment=NAME ...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(args.overrides)
        check_submittable(cfg)
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise UserError("ray.address: no cluster to submit to; set ray.address=http://HEAD:8265 or $RAY_ADDRESS")
    except Exception as error:  # a bad override or value: one line, nothing submitted
        print(f"error: {redact_text(first_line(error))}", file=sys.stderr)
        return 2
    shown = redact_text(address)
    try:
        client, job_id = submit(cfg, args.overrides, address)
    except Exception as error:  # unreachable cluster, refused token: one line
        print(f"error: submitting to {shown}: {redact_text(first_line(error))}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id} to {shown}", flush=True)
    print(f"  logs:   ray job logs --address {shown} --follow {job_id}", flush=True)
    print(f"  status: python -m pipelines.status --root {cfg.paths.root}", flush=True)
    if args.no_follow:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (ray job stop --address {shown} {job_id} ends it)",
              file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
