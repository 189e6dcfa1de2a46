"""Several nodes, one S3 store: a Ray cluster of three nodes on this machine (ray.cluster_utils)
whose worker nodes each have their own MEDDISTILL_CACHE, so the node the training worker writes on
is never the driver's cache; artifacts on the moto S3 server (the same fixture as
test_artifacts_s3). The driver's cache is a path only the driver process can open, so a worker
handed a driver path fails as it would on another machine. The teacher's rank 0 is killed after a
checkpoint and must resume from S3."""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

import pytest

from tests.pipeline_fixture import restore_local_ray
from tests.test_artifacts_s3 import s3_endpoint  # noqa: F401 - the moto server fixture

pytestmark = pytest.mark.own_ray  # a 3-node Ray cluster of its own (ray.cluster_utils)

CRASH_STEP = 2
PRIVATE_FD = 900  # above anything this process opens; Ray's processes never inherit it (close_fds)


@contextlib.contextmanager
def driver_only_path(directory: Path):
    """/proc/self/fd/N naming `directory`: in this process it is that directory, in any other
    (every Ray worker) it does not exist, as a path on the driver machine's own disk would not."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs Linux /proc/self/fd to give the driver a disk the workers cannot see")
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    os.dup2(fd, PRIVATE_FD)
    os.close(fd)
    try:
        yield f"/proc/self/fd/{PRIVATE_FD}"
    finally:
        os.close(PRIVATE_FD)


@pytest.fixture
def multinode(s3_endpoint, tmp_path, monkeypatch):  # noqa: F811
    """(bucket, driver cache, node caches): a head with no CPUs (the driver's node runs no
    workers) and two 2-CPU worker nodes, each with its own local cache. The driver reaches its
    cache (the returned folder) only through driver_only_path."""
    with driver_only_path(tmp_path / "cache-driver") as driver_cache:
        yield from _cluster(s3_endpoint, tmp_path, driver_cache, monkeypatch)


def _cluster(s3_endpoint, tmp_path, driver_cache: str, monkeypatch):  # noqa: F811
    import boto3
    import ray
    from ray.cluster_utils import Cluster

    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "MEDDISTILL_CACHE": driver_cache}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the raylets inherit these; MEDDISTILL_CACHE is overridden per node
    bucket = f"mn-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)

    ray.shutdown()  # a session Ray (ray_local) would otherwise be joined instead; restored below
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
        restore_local_ray()  # later users of the session's ray_local get it back, not an implicit Ray


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

    # rank 0 worked in a worker node's cache and removed its copy once uploaded (the stage folder goes,
    # its parent stays; a crash marker stays only where the dead worker ran on the other node); the
    # driver's copy of the model came back from the bucket
    stage_rel = f"s3/{bucket}/runs/mn/teacher"
    assert any((c / stage_rel).parent.is_dir() for c in node_caches)
    assert not [p for c in node_caches for p in (c / stage_rel).rglob("*") if p.is_file() and not p.name.startswith(".crashed")]
    assert (driver_cache / stage_rel / "model" / "config.json").is_file()

    # the bucket holds the manifest and every file it lists, with the bytes it hashed
    manifest = json.loads((driver_cache / stage_rel / "manifest.json").read_text())
    stored = set(keys(bucket, "runs/mn/teacher/"))
    assert "runs/mn/teacher/manifest.json" in stored
    assert {f"runs/mn/teacher/{rel}" for rel in manifest["files"]} <= stored
    assert any(rel.startswith("model/") and rel.endswith(".safetensors") for rel in manifest["files"])
    assert "runs/mn/teacher/" + storage.NODE_OUTPUTS not in stored

    # a local artifacts.uri passes the shared-filesystem check only where every node sees it (all do here)
    storage.require_shared_filesystem(driver_cache, "spec.artifacts.uri", str(driver_cache))
    assert not list(driver_cache.glob(".shared-check-*"))

    # another machine fetches it and it verifies
    from meddistill.artifacts import ArtifactStore, verify

    monkeypatch.setenv("MEDDISTILL_CACHE", str(driver_cache.parent / "cache-elsewhere"))
    assert verify(ArtifactStore(result.artifact_uri).fetch()).digest == result.digest
