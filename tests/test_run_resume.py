"""`meddistill run` killed between stages resumes: finished stages are skipped, digests unchanged."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from meddistill.artifacts import read_manifest, verify


def _meddistill(args: list[str], cwd: Path, **kwargs):
    # RAY_ADDRESS=local: a private Ray per process, never the test session's own cluster
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "meddistill.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_run_killed_after_the_first_stage_skips_it_on_rerun(tiny_model_dir, tiny_data_refs, tmp_path):
    from tests.pipeline_fixture import tiny_job_document

    spec_file = tmp_path / "job.yaml"
    # artifacts.uri is relative: it must resolve against the working directory (tmp_path)
    spec_file.write_text(yaml.safe_dump(tiny_job_document(str(tiny_model_dir), tiny_data_refs, "./runs", name="resume")))
    teacher_dir = tmp_path / "runs" / "resume" / "teacher"

    proc = _meddistill(["run", str(spec_file), "--no-serve"], tmp_path, start_new_session=True)
    deadline = time.time() + 300
    while not (teacher_dir / "manifest.json").exists():
        assert proc.poll() is None, f"run exited early:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "teacher stage did not finish in 300 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray it started, mid distill-data
    proc.wait()
    digest = verify(teacher_dir).digest
    assert not (tmp_path / "runs" / "resume" / "distill-data" / "manifest.json").exists() or verify(
        tmp_path / "runs" / "resume" / "distill-data") is not None

    rerun = _meddistill(["run", str(spec_file), "--stage", "teacher"], tmp_path)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    assert "skip teacher: artifact verifies" in out
    assert "skipped (verified)" in out
    assert read_manifest(teacher_dir).digest == digest  # untouched, not re-trained

    forced = _meddistill(["run", str(spec_file), "--stage", "distill-data"], tmp_path)
    out, _ = forced.communicate(timeout=300)
    assert forced.returncode == 0, out[-3000:]
    assert verify(tmp_path / "runs" / "resume" / "distill-data") is not None
    assert read_manifest(teacher_dir).digest == digest
