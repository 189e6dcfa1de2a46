"""Only "not found" means "no artifact": any other S3 answer (403, an outage: no answer at all) is
ArtifactStoreUnavailable, so neither the operator nor `meddistill run` re-runs (and overwrites) a
stage that succeeded. moto's real server over HTTP, as in tests/test_artifacts_s3.py."""
from __future__ import annotations

import json

import pytest

from meddistill import artifacts
from tests.support.kube_cluster import free_port
from tests.test_artifacts_s3 import bucket, s3_endpoint, stage_dir  # noqa: F401 - fixtures


def test_a_missing_manifest_is_no_artifact(bucket):
    assert artifacts.ArtifactStore(f"s3://{bucket}/runs/job/teacher").fetch() is None


def test_403_is_unavailable_with_the_fix_and_leaves_no_stale_manifest(bucket, tmp_path):
    import boto3

    uri = f"s3://{bucket}/runs/job/evaluate"
    store = artifacts.ArtifactStore(uri)
    store.publish(stage_dir(tmp_path / "src"))
    assert store.fetch() is not None  # a readable copy is cached ...
    boto3.client("s3").put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    with pytest.raises(artifacts.ArtifactStoreUnavailable, match=r"manifest.json: 403: .*s3:ListBucket") as e:
        store.fetch()
    assert uri in str(e.value) and e.value.code == "403"
    assert not (store.working_dir() / artifacts.MANIFEST).exists()  # ... but never claims 'complete' after a 403


def test_an_unreachable_store_is_unavailable_not_missing(bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # S3 is down
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(artifacts.ArtifactStoreUnavailable, match="unreachable: check AWS_ENDPOINT_URL"):
        artifacts.ArtifactStore(f"s3://{bucket}/runs/job/teacher").fetch()
