"""storage.node_task / collect, the one way a stage runs a plain Ray task that writes files: on an
s3:// store a task whose node has another cache writes into its own folder there and uploads it,
and collect brings the files into the driver's working dir; on a local store it writes in place.
"Another node" is a task whose MEDDISTILL_CACHE differs from the driver's (ray_local, moto S3)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_artifacts_s3 import bucket, s3_endpoint  # noqa: F401 - moto server + a bucket, env set

pytestmark = pytest.mark.usefixtures("ray_local")


def write_report(out_dir: str, kind: str, text: str) -> tuple[str, str]:
    """What an evaluate task does: a report under its model's folder; returns (its cache, where)."""
    (Path(out_dir) / kind).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / kind / "eval.json").write_text(text)
    return os.environ.get("MEDDISTILL_CACHE", ""), out_dir


def test_tasks_with_their_own_cache_upload_and_the_driver_gets_their_files(bucket, tmp_path):  # noqa: F811
    from meddistill.artifacts import ArtifactStore
    from meddistill.jobs import storage

    uri = f"s3://{bucket}/runs/job/evaluate"
    out = ArtifactStore(uri).working_dir()
    (out / "student").mkdir()
    (out / "student" / "eval.json").write_text("an earlier run's report")
    node_cache = tmp_path / "cache-node"
    with storage.stage_scope(uri) as scope:
        task = storage.node_task(write_report, out, runtime_env={"env_vars": {"MEDDISTILL_CACHE": str(node_cache)}})
        results = storage.collect([task("student", "12"), task("quantized", "345")], out)

    # each task wrote in its own folder on its node, not in the driver's directory
    assert [cache for cache, _ in results] == [str(node_cache)] * 2
    assert all(Path(where).is_relative_to(node_cache) and Path(where) != out for _, where in results)
    assert len({where for _, where in results}) == 2
    # ...and its files are in the driver's working dir now, recorded as uploaded (publish skips them)
    assert (out / "student" / "eval.json").read_text() == "12"
    assert (out / "quantized" / "eval.json").read_text() == "345"
    assert scope.uploaded == {"student/eval.json": 2, "quantized/eval.json": 3}
    assert not list(node_cache.rglob(".task-*"))  # the node keeps no copy


def test_tasks_on_a_local_store_write_in_place(tmp_path):
    from meddistill.artifacts import ArtifactStore
    from meddistill.jobs import storage

    uri = str(tmp_path / "runs" / "job" / "evaluate")
    out = ArtifactStore(uri).working_dir()
    with storage.stage_scope(uri) as scope:
        [(_, where)] = storage.collect([storage.node_task(write_report, out)("base", "6")], out)
    assert where == str(out) and (out / "base" / "eval.json").read_text() == "6"
    assert scope.uploaded == {}


def test_rank0_files_written_elsewhere_replace_a_stale_copy_of_the_same_size(bucket, tmp_path):  # noqa: F811
    """A re-run's weights have the size of the earlier run's copy in the driver's cache: that copy
    must not be kept, or the manifest hashes the old bytes while the bucket holds the new ones."""
    from meddistill.artifacts import ArtifactStore
    from meddistill.jobs import storage

    uri = f"s3://{bucket}/runs/job/teacher"
    target = ArtifactStore(uri).working_dir()
    (target / "model").mkdir()
    (target / "model" / "w.bin").write_bytes(b"old!")
    elsewhere = tmp_path / "cache-node" / "teacher"  # rank 0's folder on its node
    (elsewhere / "model").mkdir(parents=True)
    (elsewhere / "model" / "w.bin").write_bytes(b"new!")

    storage.upload_node_outputs(elsewhere, uri)
    assert storage.pull_node_outputs(uri, target) == {"model/w.bin": 4}
    assert (target / "model" / "w.bin").read_bytes() == b"new!"


def test_rank0_files_written_in_the_drivers_folder_are_not_downloaded_again(bucket):  # noqa: F811
    import boto3

    from meddistill.artifacts import ArtifactStore
    from meddistill.jobs import storage

    uri = f"s3://{bucket}/runs/job/teacher"
    target = ArtifactStore(uri).working_dir()
    (target / "w.bin").write_bytes(b"mine")
    storage.upload_node_outputs(target, uri)  # rank 0 ran on the driver's node, in its folder
    boto3.client("s3").put_object(Bucket=bucket, Key="runs/job/teacher/w.bin", Body=b"nope")  # a download would show
    assert storage.pull_node_outputs(uri, target) == {"w.bin": 4}
    assert (target / "w.bin").read_bytes() == b"mine"


def test_a_task_reading_a_missing_input_says_which_stage_to_run(bucket):  # noqa: F811
    from meddistill.jobs import storage

    with pytest.raises(FileNotFoundError, match=r"--stage teacher"):
        storage.fetch_input(f"s3://{bucket}/runs/job/teacher")
