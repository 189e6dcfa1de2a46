"""A stage Kueue holds shows `Queued`, not Running, through the RayJob's real interface.

Kueue holds a RayJob by keeping `spec.suspend: true` (the operator creates it so when the job sets
spec.queueName), admits it by setting it false and preempts it by setting it true again. The test
plays Kueue and KubeRay with patches on the real API server; the operator's reconcile runs
in-process as the chart's ServiceAccount."""

from __future__ import annotations


import pytest

from meddistill.operator import handlers
from meddistill.operator.backends import kuberay_objects
from tests.support.operator_inprocess import as_operator, fresh_namespace  # noqa: F401 - fixture
from tests.test_operator_kube import Kube, pvc_store, quickstart

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


@pytest.fixture
def kube(kube_cluster, as_operator):
    with fresh_namespace(kube_cluster, "kq") as kube:
        yield kube


def teacher(kube: Kube) -> dict:
    handlers.reconcile(kube.ns, "kq")
    return kube.job("kq")["status"]["stages"][0]


def kueue_sets_suspend(kube: Kube, name: str, suspend: bool) -> None:
    kube.custom.patch_namespaced_custom_object("ray.io", "v1", kube.ns, "rayjobs", name, {"spec": {"suspend": suspend}})


def test_a_stage_kueue_holds_is_queued_until_admitted_and_again_when_preempted(kube):
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
