"""A stage Kueue holds shows `Queued`, not Running, through the RayJob's real interface; a queue that
does not exist (or no Kueue at all) holds the job with a condition before anything is created.

Kueue holds a RayJob by keeping `spec.suspend: true` (the operator creates it so when the job sets
spec.queueName), admits it by setting it false and preempts it by setting it true again. The test
plays Kueue and KubeRay with patches on the real API server; the operator's reconcile runs
in-process as the chart's ServiceAccount."""

from __future__ import annotations

import json

import pytest
import yaml

from meddistill.operator import handlers
from meddistill.operator.backends import kuberay_objects
from tests.support.operator_inprocess import as_operator, fresh_namespace  # noqa: F401 - fixture
from tests.support.kube_cluster import REPO_ROOT
from tests.test_operator_blocked import conditions, warnings
from tests.test_operator_kube import Kube, pvc_store, quickstart, wait_for

LOCALQUEUE_CRD = REPO_ROOT / "tests" / "fixtures" / "kueue-crds" / "kueue.x-k8s.io_localqueues.yaml"

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


@pytest.fixture
def kube(kube_cluster, as_operator):
    with fresh_namespace(kube_cluster, "kq") as kube:
        yield kube


def install_localqueue(kube: Kube, name: str) -> None:
    """Kueue's real LocalQueue CRD (tests/fixtures/kueue-crds) and a LocalQueue in the test's namespace."""
    kube.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(LOCALQUEUE_CRD))

    def established() -> bool:
        crd = json.loads(kube.cluster.kubectl("get", "crd", "localqueues.kueue.x-k8s.io", "-o", "json").stdout)
        return any(c["type"] == "Established" and c["status"] == "True" for c in crd.get("status", {}).get("conditions") or [])
    wait_for(established, 30, "Kueue's LocalQueue CRD to be Established")
    queue = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": {"name": name, "namespace": kube.ns},
             "spec": {"clusterQueue": "cluster-queue"}}
    wait_for(lambda: kube.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(queue), check=False).returncode == 0,
             30, "the LocalQueue to be created")


def teacher(kube: Kube) -> dict:
    handlers.reconcile(kube.ns, "kq")
    return kube.job("kq")["status"]["stages"][0]


def kueue_sets_suspend(kube: Kube, name: str, suspend: bool) -> None:
    kube.custom.patch_namespaced_custom_object("ray.io", "v1", kube.ns, "rayjobs", name, {"spec": {"suspend": suspend}})


def test_a_job_whose_queue_does_not_exist_is_held_with_a_condition_until_it_does(kube):
    kube.apply(quickstart("kq", pvc_store(kube.ns), queueName="team-a"))
    handlers.reconcile(kube.ns, "kq")
    handlers.reconcile(kube.ns, "kq")
    cond = conditions(kube, "kq")["LocalQueueMissing"]
    installed = "no Kueue LocalQueue 'team-a' in namespace" in cond["message"]  # another test may have installed Kueue
    assert installed or "does not serve Kueue's LocalQueues" in cond["message"], cond["message"]
    assert "spec.queueName" in cond["message"] and "remove spec.queueName" in cond["message"]
    assert conditions(kube, "kq")["Degraded"]["reason"] == "LocalQueueMissing"
    assert [r for r, _ in warnings(kube, "kq")] == ["LocalQueueMissing"] and not kube.rayjobs("kq")  # nothing created

    install_localqueue(kube, "other-team")  # Kueue now, but not this job's queue
    handlers.reconcile(kube.ns, "kq")
    assert "no Kueue LocalQueue 'team-a' in namespace" in conditions(kube, "kq")["LocalQueueMissing"]["message"]
    assert not kube.rayjobs("kq")
    install_localqueue(kube, "team-a")  # the platform team creates it: the stage is created, for Kueue to admit
    handlers.reconcile(kube.ns, "kq")
    assert kube.wait_rayjob("kq-teacher-a1", timeout=5)["spec"]["suspend"] is True
    assert "LocalQueueMissing" not in conditions(kube, "kq") and conditions(kube, "kq")["Degraded"]["status"] == "False"


def test_a_stage_kueue_holds_is_queued_until_admitted_and_again_when_preempted(kube):
    install_localqueue(kube, "team-a")
    kube.apply(quickstart("kq", pvc_store(kube.ns), queueName="team-a"))
    handlers.reconcile(kube.ns, "kq")
    rj = kube.wait_rayjob("kq-teacher-a1", timeout=5)
    assert rj["spec"]["suspend"] is True and rj["metadata"]["labels"][kuberay_objects.KUEUE_QUEUE_LABEL] == "team-a"
    # KubeRay reports a suspended RayJob as Suspended until Kueue admits it.
    kube.kuberay_status("kq-teacher-a1", {"jobDeploymentStatus": "Suspended"})
    st = teacher(kube)
    assert st["state"] == "Queued" and "team-a" in st["message"], st
    assert kube.job("kq")["status"]["phase"] == "Running"  # the job itself is under way

    kueue_sets_suspend(kube, "kq-teacher-a1", False)  # admitted
    kube.kuberay_runs("kq-teacher-a1")
    assert teacher(kube)["state"] == "Running"

    kueue_sets_suspend(kube, "kq-teacher-a1", True)  # preempted by a higher-priority workload
    kube.kuberay_status("kq-teacher-a1", {"jobDeploymentStatus": "Suspending"})
    assert teacher(kube)["state"] == "Queued"
    assert sorted(kube.rayjobs("kq")) == ["kq-teacher-a1"]  # waiting is not failing: no new attempt
