"""A reconcile that cannot proceed says so on the job: a condition and one Warning event naming the
cause and the fix, never a silent retry or a false "Running".

Real kube-apiserver with the chart's RBAC (the reconcile runs in this process with the operator's
ServiceAccount credentials, kopf left out), real moto S3 over HTTP. The test plays KubeRay, as in
tests/test_operator_kube.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from meddistill import artifacts
from meddistill.operator import handlers
from meddistill.operator.backends import kuberay_objects, ray_clusters
from meddistill.operator.planner import StartStage
from meddistill.spec.models import MedDistillJob
from tests.support.operator_inprocess import as_operator, fresh_namespace  # noqa: F401 - fixture
from tests.support.kube_cluster import free_port
from tests.test_artifacts_s3 import bucket, s3_endpoint  # noqa: F401 - fixtures
from tests.test_operator_kube import Kube, install_operator_prereqs, pvc_store, quickstart, write_stage_artifact

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


@pytest.fixture
def kube(kube_cluster, as_operator):
    with fresh_namespace(kube_cluster, "blk") as kube:
        yield kube


def conditions(kube: Kube, name: str) -> dict[str, dict]:
    return {c["type"]: c for c in kube.job(name).get("status", {}).get("conditions") or []}


def warnings(kube: Kube, name: str) -> list[tuple[str, str]]:
    items = kube.core.list_namespaced_event(kube.ns, field_selector=f"involvedObject.name={name}").items
    return [(e.reason, e.message) for e in items if e.type == "Warning"]


def test_s3_403_on_a_finished_stages_manifest_is_artifact_store_unavailable_and_never_a_rerun(kube, bucket, tmp_path):
    import boto3

    uri = f"s3://{bucket}/runs"
    kube.apply(quickstart("store", uri))
    handlers.reconcile(kube.ns, "store")
    kube.wait_rayjob("store-teacher-a1", timeout=5)
    # The stage wrote its artifact; KubeRay reports it done long ago (past the planner's grace period).
    local = tmp_path / "local"
    write_stage_artifact(str(local), "store", "teacher")
    artifacts.ArtifactStore(artifacts.stage_uri(uri, kube.job_dir("store"), "teacher")).publish(local / "store" / "teacher")
    ended = (datetime.now(timezone.utc) - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.kuberay_status("store-teacher-a1", {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": ended})
    s3 = boto3.client("s3")
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}))

    handlers.reconcile(kube.ns, "store")
    handlers.reconcile(kube.ns, "store")
    assert sorted(kube.rayjobs("store")) == ["store-teacher-a1"]  # no second attempt of a stage that succeeded
    cond = conditions(kube, "store")["ArtifactStoreUnavailable"]
    assert cond["status"] == "True" and "403" in cond["message"] and "s3:ListBucket" in cond["message"]
    assert kube.job("store")["status"]["phase"] == "Pending"
    assert [r for r, _ in warnings(kube, "store")] == ["ArtifactStoreUnavailable"]  # once, not every reconcile

    s3.delete_bucket_policy(Bucket=bucket)  # the platform team fixes the policy: the pipeline carries on
    handlers.reconcile(kube.ns, "store")
    kube.wait_rayjob("store-distill-data-a1", timeout=5)
    status = kube.job("store")["status"]
    assert status["phase"] == "Running" and status["stages"][0]["state"] == "Succeeded"
    assert "ArtifactStoreUnavailable" not in conditions(kube, "store")


def test_a_pvc_claim_not_mounted_for_the_jobs_namespace_blocks_before_any_stage(kube):
    pvc_store(f"{kube.ns}-other")  # a claim named `artifacts` is mounted for another namespace only
    kube.apply(quickstart("claim", f"pvc://artifacts/{kube.ns}"))
    handlers.reconcile(kube.ns, "claim")
    handlers.reconcile(kube.ns, "claim")
    assert not kube.rayjobs("claim") and kube.job("claim")["status"]["phase"] == "Pending"
    cond = conditions(kube, "claim")["ArtifactStoreUnavailable"]
    assert f"claim artifacts of namespace {kube.ns}" in cond["message"], cond["message"]
    assert f"add {{namespace: {kube.ns}, claim: artifacts, operatorClaim:" in cond["message"]
    assert [r for r, _ in warnings(kube, "claim")] == ["ArtifactStoreUnavailable"]  # once, not every reconcile
    degraded = conditions(kube, "claim")["Degraded"]  # the stable type a dashboard alerts on, with the cause
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("True", "ArtifactStoreUnavailable", cond["message"])

    pvc_store(kube.ns)  # the platform team adds the artifactClaims entry: the job starts
    handlers.reconcile(kube.ns, "claim")
    kube.wait_rayjob("claim-teacher-a1", timeout=5)
    assert "ArtifactStoreUnavailable" not in conditions(kube, "claim")
    degraded = conditions(kube, "claim")["Degraded"]  # still there, now False
    assert (degraded["status"], degraded["reason"]) == ("False", "Reconciled")


def test_a_foreign_rayjob_holding_the_childs_name_is_child_conflict_not_running(kube):
    doc = quickstart("clash", pvc_store(kube.ns))
    foreign = kuberay_objects.rayjob(MedDistillJob.model_validate({**doc, "metadata": {"name": "clash", "namespace": kube.ns}}),
                                     "someone-else", StartStage("teacher", 1, "clash-teacher-a1"))
    del foreign["metadata"]["ownerReferences"]  # e.g. another team's RayJob of the same name
    kube.custom.create_namespaced_custom_object("ray.io", "v1", kube.ns, "rayjobs", foreign)
    kube.apply(doc)

    handlers.reconcile(kube.ns, "clash")
    handlers.reconcile(kube.ns, "clash")
    status = kube.job("clash")["status"]
    assert status["phase"] != "Running"
    cond = conditions(kube, "clash")["ChildConflict"]
    assert cond["status"] == "True" and "RayJob" in cond["message"] and "clash-teacher-a1" in cond["message"]
    assert "kubectl delete rayjobs.ray.io" in cond["message"]
    assert conditions(kube, "clash")["Progressing"]["status"] == "False"
    assert [r for r, _ in warnings(kube, "clash")] == ["ChildConflict"]
    assert "ownerReferences" not in kube.rayjobs("clash")["clash-teacher-a1"]["metadata"]  # left as it was

    kube.custom.delete_namespaced_custom_object("ray.io", "v1", kube.ns, "rayjobs", "clash-teacher-a1")
    handlers.reconcile(kube.ns, "clash")
    mine = kube.wait_rayjob("clash-teacher-a1", timeout=5)
    assert mine["metadata"]["ownerReferences"][0]["uid"] == kube.job("clash")["metadata"]["uid"]
    assert kube.job("clash")["status"]["phase"] == "Running" and "ChildConflict" not in conditions(kube, "clash")


def test_the_api_server_refusing_a_child_is_a_condition_and_event_naming_the_field(kube, monkeypatch):
    # The CRD refuses such a queue name at apply time now (tests/invalid_specs/bad-queue-name.yaml); a job
    # stored before that rule still reaches the operator: its RayJob carries the old value.
    from meddistill.operator.backends import kuberay
    real = kuberay.rayjob

    def with_old_queue_name(job, uid, start):
        body = real(job, uid, start)
        body["metadata"]["labels"][kuberay_objects.KUEUE_QUEUE_LABEL] = "team a!"  # no valid label value
        return body
    monkeypatch.setattr(kuberay, "rayjob", with_old_queue_name)
    from tests.test_operator_kueue_queued import install_localqueue

    install_localqueue(kube, "team-a")  # the queue exists: the API server's refusal is what holds the job
    kube.apply(quickstart("badq", pvc_store(kube.ns), queueName="team-a"))
    handlers.reconcile(kube.ns, "badq")
    cond = conditions(kube, "badq")["ChildRefused"]
    assert cond["status"] == "True" and "spec.queueName" in cond["message"] and "422" in cond["message"]
    assert warnings(kube, "badq") == [("ChildRefused", cond["message"])]
    assert not kube.rayjobs("badq") and kube.job("badq")["status"]["phase"] == "Pending"


def test_an_unreachable_ray_cluster_is_a_condition_and_event(kube, monkeypatch):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setattr(ray_clusters, "ALLOWED", ray_clusters.AllowedClusters(
        clusters=[ray_clusters.AllowedCluster(name="down", address=address)]))  # listed by the platform team
    kube.apply(quickstart("noray", pvc_store(kube.ns), ray={"cluster": "down"}))
    handlers.reconcile(kube.ns, "noray")
    cond = conditions(kube, "noray")["RayClusterUnavailable"]
    assert cond["status"] == "True" and address in cond["message"] and "Ray cluster 'down'" in cond["message"]
    assert [r for r, _ in warnings(kube, "noray")] == ["RayClusterUnavailable"]


def test_a_forbidden_create_is_a_condition_and_event_naming_the_rbac_fix(kube_cluster, kube):
    from tests.test_operator_rbac import namespaced_rbac

    # Only a namespaced Role without 'create' on rayjobs authorizes the operator here.
    kube_cluster.kubectl("delete", "clusterrolebinding", "meddistill-meddistill-operator", "--ignore-not-found")
    kube_cluster.kubectl("apply", "-f", "-", input=namespaced_rbac(kube_cluster, kube.ns, drop_verb=("rayjobs", "create")))
    try:
        kube.apply(quickstart("norbac", pvc_store(kube.ns)))
        handlers.reconcile(kube.ns, "norbac")
        cond = conditions(kube, "norbac")["Forbidden"]
        assert cond["status"] == "True" and "403" in cond["message"] and "ClusterRole/Role" in cond["message"]
        assert [r for r, _ in warnings(kube, "norbac")] == ["Forbidden"]
        assert not kube.rayjobs("norbac") and kube.job("norbac")["status"]["phase"] == "Pending"
    finally:
        install_operator_prereqs(kube_cluster)  # the cluster-wide binding, for the other tests


def test_a_local_artifacts_uri_on_kuberay_is_refused_before_any_stage(kube, tmp_path):
    kube.apply(quickstart("local", str(tmp_path / "runs")))  # each KubeRay pod would write its own copy
    handlers.reconcile(kube.ns, "local")
    handlers.reconcile(kube.ns, "local")
    assert not kube.rayjobs("local")
    status = kube.job("local")["status"]
    assert status["phase"] == "Failed"
    failed = conditions(kube, "local")["Failed"]
    assert failed["reason"] == "ArtifactStoreNotShared" and "pvc://CLAIM/PATH" in failed["message"]
    assert [r for r, _ in warnings(kube, "local")] == ["ArtifactStoreNotShared"]  # once, not every reconcile

    kube.apply(quickstart("local", pvc_store(kube.ns)))  # the fix the condition names: the job starts
    handlers.reconcile(kube.ns, "local")
    kube.wait_rayjob("local-teacher-a1", timeout=5)
