"""Several nodes, one S3 store: a Ray cluster of three nodes on this machine (ray.cluster_utils)
whose worker nodes each have their own MEDDISTILL_CACHE, so the node the training worker writes on
is never the driver's cache; artifacts on the moto S3 server (the same fixture as
test_artifacts_s3). The teacher's rank 0 is killed after a checkpoint and must resume from S3."""
from __future__ import annotations

import json
import threading
import uuid

import pytest

from tests.support.kube_cluster import free_port

CRASH_STEP = 2


def s3_compliant_moto(environ_app):
    """moto 5 names CompleteMultipartUpload's XML root `...Response` where S3 (and MinIO) say
    `...Result`; pyarrow's S3 client, which Ray Train writes checkpoints with, then reports every
    multipart upload as failed. This WSGI wrapper renames the root; nothing else changes."""
    def app(environ, start_response):
        captured = []
        body = b"".join(environ_app(environ, lambda status, headers, exc_info=None: captured.append((status, headers))))
        status, headers = captured[0]
        if b"<CompleteMultipartUploadResponse" in body:
            body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
            headers = [(k, str(len(body)) if k.lower() == "content-length" else v) for k, v in headers]
        start_response(status, headers)
        return [body]

    return app


@pytest.fixture(scope="module")
def s3_endpoint():
    """The moto S3 server, as in test_artifacts_s3, behind s3_compliant_moto."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", free_port(), s3_compliant_moto(DomainDispatcherApplication(create_backend_app)),
                         threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


@pytest.fixture
def multinode(s3_endpoint, tmp_path, monkeypatch):
    """(bucket, driver cache, node caches): a head with no CPUs (the driver's node runs no
    workers) and two 2-CPU worker nodes, each with its own local cache."""
    import boto3
    import ray
    from ray.cluster_utils import Cluster

    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "MEDDISTILL_CACHE": str(tmp_path / "cache-driver")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the raylets inherit these; MEDDISTILL_CACHE is overridden per node
    bucket = f"mn-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)

    ray.shutdown()  # a session Ray (ray_local) would otherwise be joined instead
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    caches = [tmp_path / f"cache-node-{i}" for i in range(2)]
    for cache in caches:
        cluster.add_node(num_cpus=2, env_vars={"MEDDISTILL_CACHE": str(cache)})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield bucket, tmp_path / "cache-driver", caches
    finally:
        ray.shutdown()
        cluster.shutdown()


def keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
def test_teacher_on_another_node_publishes_to_s3_and_resumes_from_an_s3_checkpoint(
        multinode, tiny_model_dir, tiny_data_refs, monkeypatch):
    from meddistill.jobs import storage, train_common
    from meddistill.jobs.stage import StageContext, run_stage
    from meddistill.spec.models import MedDistillJob
    from tests.pipeline_fixture import tiny_job_document

    bucket, driver_cache, node_caches = multinode
    doc = tiny_job_document(str(tiny_model_dir), tiny_data_refs, f"s3://{bucket}/runs", name="mn",
                            teacher={"training": {"maxSteps": 3, "checkpointEverySteps": 1}})
    ctx = StageContext(MedDistillJob.model_validate(doc))

    seen_checkpoints = []
    delete = storage.delete_checkpoints

    def record_then_delete(uri):  # what Ray Train left under the storage path, before the clean-up
        seen_checkpoints.extend(keys(bucket, f"runs/mn/teacher/{storage.CHECKPOINTS}/"))
        return delete(uri)

    monkeypatch.setattr(storage, "delete_checkpoints", record_then_delete)
    monkeypatch.setenv(train_common.CRASH_ENV, str(CRASH_STEP))
    result = run_stage(ctx, "teacher")

    assert result.metrics["resumed_from_step"] == CRASH_STEP and result.metrics["step"] == 3
    # the checkpoints lived in the bucket, under the stage's storage path, and only there
    assert any("/checkpoint_" in k for k in seen_checkpoints), seen_checkpoints
    assert not keys(bucket, f"runs/mn/teacher/{storage.CHECKPOINTS}/")  # removed once the artifact exists
    assert not [p for cache in [driver_cache, *node_caches] for p in cache.rglob(storage.CHECKPOINTS)]

    # rank 0 wrote the model on a worker node, in that node's cache, never in the driver's
    stage_rel = f"s3/{bucket}/runs/mn/teacher"
    written = [c for c in node_caches if (c / stage_rel / "model" / "config.json").is_file()]
    assert len(written) == 1

    # the bucket holds the manifest and every file it lists, with the bytes it hashed
    manifest = json.loads((driver_cache / stage_rel / "manifest.json").read_text())
    stored = set(keys(bucket, "runs/mn/teacher/"))
    assert "runs/mn/teacher/manifest.json" in stored
    assert {f"runs/mn/teacher/{rel}" for rel in manifest["files"]} <= stored
    assert any(rel.startswith("model/") and rel.endswith(".safetensors") for rel in manifest["files"])
    assert "runs/mn/teacher/" + storage.NODE_OUTPUTS not in stored

    # another machine fetches it and it verifies
    from meddistill.artifacts import ArtifactStore, verify

    monkeypatch.setenv("MEDDISTILL_CACHE", str(driver_cache.parent / "cache-elsewhere"))
    assert verify(ArtifactStore(result.artifact_uri).fetch()).digest == result.digest
