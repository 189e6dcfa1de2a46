"""What `meddistill run` says about reuse: every stage skipped while nothing changed (no Ray
started), then "re-running quantize: spec.quantization changed ..." once quantization changes,
and a failed stage ends with the path of the run's log file.

The artifacts are stand-ins written with the real manifests (no training), so the quantize
re-run fails on them: that failure is the error path under test.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from meddistill.artifacts import write_manifest
from meddistill.jobs.stage import StageContext, input_digests, spec_fingerprint
from meddistill.spec.models import MedDistillJob, pipeline_stages
from tests.pipeline_fixture import tiny_job_document

pytestmark = pytest.mark.timeout(300)


def _meddistill(args, cwd):
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "meddistill.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_run_skips_matching_stages_and_says_why_one_reruns(tmp_path):
    doc = tiny_job_document("/models/none", {"train": "jsonl:train.jsonl", "eval": "jsonl:eval.jsonl"},
                            str(tmp_path / "runs"), name="msgs")
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    ctx = StageContext(MedDistillJob.model_validate(doc))
    for stage in pipeline_stages(ctx.spec):  # what run_stage records, without the recipes
        out = ctx.output_dir(stage)
        inputs = input_digests(ctx, stage)
        (out / "stand-in.txt").write_text(stage)
        write_manifest(out, stage=stage, config={}, fingerprint=spec_fingerprint(ctx, stage), inputs=inputs)

    same = _meddistill(["run", str(spec_file), "--no-serve"], tmp_path)
    assert same.returncode == 0, same.stderr[-3000:]
    for stage in pipeline_stages(ctx.spec):
        assert f"skip {stage}: artifact verifies and matches the spec" in same.stderr
    assert "re-running" not in same.stderr

    doc["spec"]["quantization"]["method"] = "int8"
    spec_file.write_text(yaml.safe_dump(doc))
    changed = _meddistill(["run", str(spec_file), "--no-serve"], tmp_path)
    err = changed.stderr
    assert "re-running quantize: spec.quantization changed since the artifact was made" in err, err[-3000:]
    assert "skip distill: artifact verifies" in err and "skip evaluate" not in err
    assert changed.returncode == 1 and "error: stage quantize" in err  # a stand-in adapter does not load
    log_file = err.rsplit("details: ", 1)[1].split()[0]
    assert log_file.startswith(str(tmp_path / "runs" / "msgs" / "logs" / "run-")) and os.path.isfile(log_file)
    assert "stage quantize failed" in open(log_file).read()  # the whole traceback is in the file
