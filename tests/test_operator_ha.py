"""High availability: two operator replicas with kopf peering, one active; killed mid-pipeline, the
standby carries on with no duplicate children.

Both are real `meddistill operator` processes against the real API server, with the chart's RBAC
and its ClusterKopfPeering. The test plays KubeRay (RayJob /status patches): the active replica
starts the teacher; it is SIGKILLed; the RayJob then fails; the standby, once the dead replica's
peering entry expires, reconciles and starts exactly one retry."""

from __future__ import annotations

import uuid

import pytest

from tests.test_operator_kube import Kube, OperatorProcess, install_operator_prereqs, pvc_store, quickstart, wait_for

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = [pytest.mark.kube, pytest.mark.slow]

PEERING = "meddistill-meddistill"  # the chart's ClusterKopfPeering for release "meddistill"
LIFETIME_S = 5  # how long a silent active replica is trusted (the chart's default is 60)


def replica(kube_cluster, tmp_path, name: str, priority: int) -> OperatorProcess:
    return OperatorProcess(kube_cluster, tmp_path / f"{name}.log", resync=1.0, args=(
        "--peering", PEERING, "--peering-priority", str(priority), "--peering-lifetime", str(LIFETIME_S))).start()


def peers(kube: Kube) -> dict:
    obj = kube.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", PEERING)
    return obj.get("status") or {}


def test_the_standby_takes_over_when_the_active_replica_dies_mid_pipeline(kube_cluster, tmp_path):
    install_operator_prereqs(kube_cluster)
    ns = f"ha-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", ns)
    kube = Kube(kube_cluster, ns)
    active = replica(kube_cluster, tmp_path, "active", priority=200)
    standby = replica(kube_cluster, tmp_path, "standby", priority=100)
    try:
        wait_for(lambda: sorted(int(p["priority"]) for p in peers(kube).values()) == [100, 200], 30, "both peers")
        kube.apply(quickstart("ha", pvc_store(ns), runPolicy={"backoffLimit": 2}))
        kube.wait_rayjob("ha-teacher-a1", timeout=20)
        kube.kuberay_runs("ha-teacher-a1")
        active.wait_resyncs()  # the active replica looked again; the standby has no resyncs at all
        assert "created RayJob" in active.log() and "created RayJob" not in standby.log()
        assert "meddistill_operator_reconciles_total{" not in standby.metrics()  # not even its resync reconciles
        assert standby.resyncs() == 0

        active.stop(kill=True)  # SIGKILL: no goodbye in the peering object
        kube.kuberay_fails("ha-teacher-a1", "AppFailed", "Job entrypoint command failed with exit code 1")
        # The standby resumes once the dead entry expires, and starts the retry after its backoff.
        kube.wait_rayjob("ha-teacher-a2", timeout=LIFETIME_S + 40)
        wait_for(lambda: kube.job("ha")["status"]["stages"][0]["attempt"] == 2, 15, "status attempt 2")
        standby.wait_resyncs()
        assert sorted(kube.rayjobs("ha")) == ["ha-teacher-a1", "ha-teacher-a2"]  # no duplicate children
        assert "created RayJob" in standby.log()
    finally:
        active.stop()
        standby.stop()
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
