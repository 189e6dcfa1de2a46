"""s3:// artifact stores against a real S3 API: moto's server over HTTP, reached with boto3 exactly
as in production (AWS_ENDPOINT_URL, as for MinIO or Ceph in a hospital)."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from meddistill import artifacts
from tests.support.kube_cluster import free_port


@pytest.fixture(scope="module")
def s3_endpoint():
    import moto.server  # noqa: F401 - moto[server] is a dev dependency: missing is a failure, never a skip
    from tests.support.moto_s3 import moto_s3_server

    with moto_s3_server(free_port()) as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "MEDDISTILL_CACHE": str(tmp_path / "cache-1")}.items():
        monkeypatch.setenv(key, value)
    name = f"runs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def stage_dir(root: Path) -> Path:
    d = root / "evaluate"
    (d / "model").mkdir(parents=True)
    (d / "model" / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (d / "results.json").write_text(json.dumps({"rows": [{"model": "student", "accuracy": 0.5}]}))
    artifacts.write_manifest(d, stage="evaluate", config={"k": 1}, metrics={"accuracy": 0.5})
    return d


def test_publish_then_fetch_round_trips_and_verifies(bucket, tmp_path, monkeypatch):
    local = stage_dir(tmp_path / "src")
    uri = f"s3://{bucket}/runs/job/evaluate"
    artifacts.ArtifactStore(uri).publish(local)

    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "cache-2"))  # another machine: nothing cached
    fetched = artifacts.ArtifactStore(uri).fetch()
    assert fetched != local and str(fetched).startswith(str(tmp_path / "cache-2"))
    assert artifacts.verify(fetched).digest == artifacts.read_manifest(local).digest

    weights = fetched / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert artifacts.ArtifactStore(uri).fetch() == fetched
    assert weights.stat().st_mtime_ns == before  # unchanged files are not downloaded again
    weights.write_bytes(b"corrupt")
    artifacts.ArtifactStore(uri).fetch()
    assert artifacts.verify(fetched) is not None  # a damaged local copy is fetched anew


def test_fetch_only_gets_the_manifest_and_the_named_files(bucket, tmp_path):
    uri = f"s3://{bucket}/runs/job/evaluate"
    artifacts.ArtifactStore(uri).publish(stage_dir(tmp_path / "src"))
    fetched = artifacts.ArtifactStore(uri).fetch(only={"results.json"})
    assert sorted(p.name for p in fetched.rglob("*") if p.is_file()) == ["manifest.json", "results.json"]


def test_a_stage_without_manifest_is_not_there(bucket, tmp_path):
    import boto3

    uri = f"s3://{bucket}/runs/job/teacher"
    boto3.client("s3").put_object(Bucket=bucket, Key="runs/job/teacher/half-written.bin", Body=b"x")
    assert artifacts.ArtifactStore(uri).fetch() is None


def test_operator_reads_manifest_and_results_but_never_the_weights(bucket, tmp_path):
    from meddistill.operator.stage_artifacts import read_artifact
    from meddistill.spec.models import MedDistillJob
    from tests.test_operator_kube import quickstart

    local = stage_dir(tmp_path / "src")
    job = MedDistillJob.model_validate(quickstart("job", f"s3://{bucket}/runs"))
    artifacts.ArtifactStore(artifacts.stage_uri(job.spec.artifacts.uri, "job", "evaluate")).publish(local)
    record = read_artifact(job, "evaluate")
    assert record.digest == artifacts.read_manifest(local).digest
    assert record.results == json.loads((local / "results.json").read_text())
    cache = Path(os.environ["MEDDISTILL_CACHE"])
    assert not list(cache.rglob("model.safetensors"))


@pytest.mark.usefixtures("ray_local")
def test_stages_publish_to_s3_and_read_their_inputs_back_from_it(bucket, tiny_model_dir, tiny_data_refs, tmp_path,
                                                                 monkeypatch):
    from meddistill.jobs.stage import StageContext, existing_result, run_stage
    from meddistill.spec.models import MedDistillJob
    from tests.pipeline_fixture import tiny_job_document

    doc = tiny_job_document(str(tiny_model_dir), tiny_data_refs, f"s3://{bucket}/runs", name="s3job",
                            teacher={"training": {"maxSteps": 1}})
    ctx = StageContext(MedDistillJob.model_validate(doc))
    teacher = run_stage(ctx, "teacher")
    assert teacher.artifact_uri == f"s3://{bucket}/runs/s3job/teacher"

    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "cache-2"))  # the next stage runs elsewhere
    assert existing_result(ctx, "teacher").digest == teacher.digest  # `meddistill run` would skip it
    data = run_stage(ctx, "distill-data")  # reads the teacher's weights from S3
    assert data.metrics["examples"] > 0
    assert (tmp_path / "cache-2" / "s3" / bucket / "runs" / "s3job" / "teacher" / "model").is_dir()
