"""pipelines.submit before anything reaches a cluster: the job's command line, and bad
configurations refused locally with one line naming the key (no Ray)."""
from __future__ import annotations

import pytest

from pipelines import submit


def test_entrypoint_keeps_the_overrides_quoted_and_drops_the_client_address():
    line = submit.entrypoint(["+experiment=tiny", "ray.address=http://head:8265", "task.prompt_template={text} ->"])
    assert line == "python -m pipelines.run +experiment=tiny 'task.prompt_template={text} ->'"


@pytest.mark.parametrize("overrides,message", [
    (["+experiment=tiny", "paths.root=/shared/runs", "pretrain.zero_stage=7"], "error: pretrain.zero_stage: must be"),
    (["+experiment=tiny", "paths.root=runs"], "error: paths.root: 'runs' is relative"),
    (["+experiment=tiny", "paths.root=s3://bucket/runs", "paths.store=s3://bucket/copy"],
     "error: paths.store: with a URI paths.root (s3://bucket/runs) the root is the store"),
    (["+experiment=tiny", "paths.root=/shared/runs"], "error: ray.address: no cluster to submit to"),
    (["+experiment=tiny", "paths.root=/shared/runs", "no_such_key=1"], "error: Could not override 'no_such_key'"),
])
def test_bad_configuration_fails_before_submission(overrides, message, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(submit, "submit", lambda *a: pytest.fail("submitted"))
    assert submit.main(overrides) == 2
    assert capsys.readouterr().err.startswith(message)


def test_uri_root_creates_nothing_local_under_its_name(tmp_path):
    """Hydra starts before validation: its run directory goes to the local working copy
    (paths.cache), never to a local folder named like the URI."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "+experiment=tiny",
                           f"paths.root=file://{tmp_path}/store", f"paths.cache={tmp_path}/cache", "dry_run=true"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ingest" in proc.stdout and "no earlier run" in proc.stdout
    assert not (tmp_path / "file:").exists() and (tmp_path / "cache" / "hydra").is_dir()
