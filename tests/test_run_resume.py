"""`meddistill run` killed mid-stage resumes from its checkpoint; a finished stage is skipped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from meddistill.artifacts import read_manifest, verify

pytestmark = pytest.mark.own_ray  # a private Ray per `meddistill run`


def _meddistill(args: list[str], cwd: Path, **kwargs):
    # RAY_ADDRESS=local: a private Ray per process, never the test session's own cluster
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "meddistill.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_killed_run_resumes_from_checkpoint_then_skips_the_finished_stage(tiny_model_dir, tiny_data_refs, tmp_path):
    from tests.pipeline_fixture import tiny_job_document

    steps = 30  # the kill comes a few steps after the first checkpoint (step 2); the rest is the resumed run
    doc = tiny_job_document(str(tiny_model_dir), tiny_data_refs, "./runs", name="resume",
                            teacher={"training": {"maxSteps": steps, "epochs": 10, "checkpointEverySteps": 2, "batchSize": 2, "maxSeqLength": 64}})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(doc))  # artifacts.uri ./runs resolves against the cwd (tmp_path)
    teacher_dir = tmp_path / "runs" / "resume" / "teacher"

    # 1. SIGKILL the CLI (and the Ray it started) once a checkpoint has been written.
    proc = _meddistill(["run", str(spec_file), "--stage", "teacher"], tmp_path, start_new_session=True)
    deadline = time.time() + 300
    while not list((teacher_dir / "ray_train").glob("*/checkpoint_*")):
        assert proc.poll() is None, f"run exited before its first checkpoint:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    time.sleep(4)  # let Ray Train's controller register it
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (teacher_dir / "manifest.json").exists(), "the stage finished before it was killed; raise maxSteps"

    # 2. A fresh run on the same storage picks the latest checkpoint up instead of step 0.
    rerun = _meddistill(["run", str(spec_file), "--stage", "teacher"], tmp_path)
    out, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, out[-3000:]
    manifest = verify(teacher_dir)
    assert manifest is not None
    assert manifest.metrics["step"] == steps
    assert 2 <= manifest.metrics["resumed_from_step"] < steps and manifest.metrics["resumed_from_step"] % 2 == 0

    # 3. Once finished, a re-run skips the stage and leaves its artifact alone.
    again = _meddistill(["run", str(spec_file), "--stage", "teacher"], tmp_path)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "skip teacher: artifact verifies" in out and "skipped (verified)" in out
    assert read_manifest(teacher_dir).digest == manifest.digest
