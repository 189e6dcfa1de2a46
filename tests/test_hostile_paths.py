"""Hostile files stay harmless: paths from manifests and bucket listings never leave the cache, and a
failed stage's log text (which can quote a patient record) never reaches status or events.

S3 is moto's real server reached with boto3, as in tests/test_artifacts_s3.py.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from meddistill import artifacts, modelsource
from meddistill.operator.backends import kuberay_objects as kuberay
from meddistill.operator.backends import raycluster_objects as rb
from meddistill.operator.planner import Observed, plan
from tests.test_artifacts_s3 import bucket, s3_endpoint  # noqa: F401 - fixtures
from tests.test_planner_raybackend import details, job

HOSTILE_KEYS = ["../../escaped.txt", "/etc/escaped-abs.txt"]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("rel", HOSTILE_KEYS)
def test_a_manifest_naming_a_path_outside_the_cache_writes_nothing_and_names_the_key(bucket, tmp_path, rel):
    import boto3

    s3 = boto3.client("s3")
    prefix = "runs/job/teacher"
    # Objects exist for both keys (S3 keys may contain `..`), so only the path check can stop the write.
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=b"owned")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/ok.txt", Body=b"fine")
    manifest = {"stage": "teacher", "files": {"ok.txt": "0" * 64, rel: "0" * 64}, "config": {}, "data_digest": "",
                "metrics": {}, "created": 0}
    s3.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest).encode())
    before = files_under(tmp_path)

    with pytest.raises(artifacts.UnsafePathError, match=re.escape(repr(rel))):
        artifacts.ArtifactStore(f"s3://{bucket}/{prefix}").fetch()
    assert files_under(tmp_path) == before  # not even ok.txt: the manifest is refused as a whole
    assert not Path("/etc/escaped-abs.txt").exists()


def test_a_symlink_planted_in_the_cache_does_not_redirect_a_download(bucket, tmp_path):
    prefix = "runs/job/evaluate"
    src = tmp_path / "src" / "evaluate"
    (src / "model").mkdir(parents=True)
    (src / "model" / "w.bin").write_bytes(os.urandom(64))
    artifacts.write_manifest(src, stage="evaluate", config={})
    artifacts.ArtifactStore(f"s3://{bucket}/{prefix}").publish(src)
    cache = artifacts.ArtifactStore(f"s3://{bucket}/{prefix}").working_dir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache / "model").symlink_to(outside, target_is_directory=True)  # e.g. left by another tenant's job

    with pytest.raises(artifacts.UnsafePathError, match="model/w.bin"):
        artifacts.ArtifactStore(f"s3://{bucket}/{prefix}").fetch()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("rel", ["../../escaped.bin", "sub/../../../escaped.bin"])
def test_a_bucket_listing_with_escaping_keys_writes_nothing_outside_the_model_cache(bucket, tmp_path, monkeypatch, rel):
    import boto3

    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="models/m/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key=f"models/m/{rel}", Body=b"owned")

    with pytest.raises(artifacts.UnsafePathError, match="escaped.bin"):
        modelsource.resolve_model_source(f"s3://{bucket}/models/m/")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written, in the cache or beside it


PATIENT_LINE = "Patient Jane Roe, MRN 00123456, DOB 1961-02-03: metastatic carcinoma"


def test_a_failed_ray_job_whose_log_quotes_a_record_leaves_no_log_text_in_status_or_events():
    logs = (f"step 3 loss 1.2\nrecord: {PATIENT_LINE}\nTraceback (most recent call last):\n"
            f"ValueError: cannot tokenize {PATIENT_LINE!r}\nerror: stage teacher: ValueError: cannot tokenize {PATIENT_LINE!r}\n")
    d = details(status="FAILED", error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
                message="Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n" + logs)
    run = rb.stage_run(d, logs, "https://ray:8265")
    j = job()
    j.spec.run_policy.backoff_limit = 0  # the failure is final: the Failed condition and JobFailed event are written
    out = plan(j, Observed(runs=(run,)), datetime.now(timezone.utc))
    written = json.dumps(out.status) + json.dumps([e.__dict__ for e in out.events])
    assert "stage teacher raised ValueError" in written and f"ray job logs {run.name} " in written
    assert run.name == "team-a_qs_teacher_a1"  # namespace_job_stage_attempt: unambiguous across namespaces
    for fragment in ("Jane Roe", "00123456", "carcinoma", "tokenize", "loss 1.2"):
        assert fragment not in written


def test_a_failed_rayjob_status_message_from_kuberay_is_redacted_too():
    obj = {"metadata": {"name": "qs-distill-a1", "namespace": "team-a",
                        "labels": {kuberay.LABEL_STAGE: "distill", kuberay.LABEL_ATTEMPT: "1"}},
           "status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                      "message": "Job entrypoint command failed with exit code 1, last available logs (truncated):\n"
                                 f"{PATIENT_LINE}\nerror: stage distill: KeyError: {PATIENT_LINE!r}"}}
    run = kuberay.stage_run(obj)
    assert run.message == ("stage distill raised KeyError | Job entrypoint command failed with exit code 1 | "
                           "full log: kubectl logs -n team-a job/qs-distill-a1")
