"""Same-named jobs in two namespaces sharing one bucket keep their own artifacts, and a job deleted and
re-created under its name starts afresh: the operator's stages write under
`<uri>/<namespace>/<name>-<uid[:8]>/`, and the operator reads the manifests from there.

Real kube-apiserver with the chart's RBAC (reconcile in-process as the operator's ServiceAccount, as
tests/test_operator_blocked.py; the test plays KubeRay), real moto S3. The stage's side is the real
StageContext reading the job document the RayJob carries.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from meddistill import artifacts
from meddistill.jobs.stage import StageContext
from meddistill.operator import handlers
from meddistill.spec.models import MedDistillJob
from tests.test_artifacts_s3 import bucket, s3_endpoint  # noqa: F401 - fixtures
from tests.test_operator_blocked import as_operator  # noqa: F401 - fixture
from tests.test_operator_kube import Kube, quickstart, wait_for

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


@pytest.fixture
def two_namespaces(kube_cluster, as_operator):  # noqa: F811
    kubes = []
    for _ in range(2):
        ns = f"ten-{uuid.uuid4().hex[:6]}"
        kube_cluster.kubectl("create", "namespace", ns)
        kubes.append(Kube(kube_cluster, ns))
    yield kubes
    for k in kubes:
        kube_cluster.kubectl("delete", "namespace", k.ns, "--wait=false", "--ignore-not-found")


def stage_context(kube: Kube, rayjob: str) -> StageContext:
    """What the stage entrypoint in this RayJob sees: the job document from its runtime env."""
    spec = kube.rayjobs("twin")[rayjob]["spec"]
    doc = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["MEDDISTILL_JOB"]
    return StageContext(MedDistillJob.model_validate(json.loads(doc)))


def run_teacher(kube: Kube, tmp_path, marker: str) -> str:
    """Play the teacher stage: publish its artifact where the stage would, then KubeRay reports success."""
    ctx = stage_context(kube, "twin-teacher-a1")
    local = tmp_path / kube.ns / "teacher"
    local.mkdir(parents=True)
    (local / "output.txt").write_text(marker)
    digest = artifacts.write_manifest(local, stage="teacher", config={}).digest
    artifacts.ArtifactStore(ctx.uri("teacher")).publish(local)
    kube.kuberay_runs("twin-teacher-a1")
    kube.kuberay_succeeds("twin-teacher-a1")
    return digest


def test_same_named_jobs_in_two_namespaces_and_a_recreated_job_keep_their_own_artifacts(two_namespaces, bucket, tmp_path):  # noqa: F811
    import boto3

    uri = f"s3://{bucket}/runs"
    for kube in two_namespaces:
        kube.apply(quickstart("twin", uri))
        handlers.reconcile(kube.ns, "twin")
        kube.wait_rayjob("twin-teacher-a1", timeout=5)
    uris = [stage_context(k, "twin-teacher-a1").uri("teacher") for k in two_namespaces]
    for kube, stage_uri in zip(two_namespaces, uris):
        uid = kube.job("twin")["metadata"]["uid"]
        assert stage_uri == f"{uri}/{kube.ns}/twin-{uid[:8]}/teacher"

    digests = [run_teacher(k, tmp_path, f"from {k.ns}") for k in two_namespaces]
    assert digests[0] != digests[1]
    for kube, digest in zip(two_namespaces, digests):
        handlers.reconcile(kube.ns, "twin")
        teacher = kube.job("twin")["status"]["stages"][0]
        assert (teacher["state"], teacher["artifactDigest"]) == ("Succeeded", digest)  # its own, not the other's
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]
    assert {k.split("/")[1] for k in keys} == {k.ns for k in two_namespaces}

    # Deleted and re-created under the same name: a new identity, nothing of the old job's is found.
    first = two_namespaces[0]
    first.custom.delete_namespaced_custom_object("meddistill.io", "v1alpha1", first.ns, "meddistilljobs", "twin")
    wait_for(lambda: not first.rayjobs("twin"), 30, "the garbage collector to remove the old RayJob")
    first.apply(quickstart("twin", uri))
    handlers.reconcile(first.ns, "twin")
    first.wait_rayjob("twin-teacher-a1", timeout=5)
    assert stage_context(first, "twin-teacher-a1").uri("teacher") != uris[0]
    handlers.reconcile(first.ns, "twin")
    assert first.job("twin")["status"]["stages"][0]["state"] != "Succeeded"  # the old artifact is not inherited
