"""The job's head NetworkPolicy `<job>-ray-head` is the job's own, and comes back when deleted.

Against the real API server, as the chart's ServiceAccount (kopf left out): a policy name taken by an
object the job does not own blocks the job (ChildConflict naming it, its owners and the fix) before
anything reaches KubeRay, and leaves that object as it was. The job's own policy, deleted while a
stage runs, is back after the next reconcile. (Ray token Secrets are KubeRay's: the operator holds no
Secret verb.)"""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from meddistill.operator import handlers, kube_api
from meddistill.operator.backends.kuberay import METADATA_ONLY
from tests.support.operator_inprocess import as_operator, fresh_namespace  # noqa: F401 - fixture
from tests.test_operator_blocked import conditions, warnings
from tests.test_operator_kube import pvc_store, quickstart

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


@pytest.fixture
def kube(kube_cluster, as_operator):
    with fresh_namespace(kube_cluster, "guard") as kube:
        kube.net = client.NetworkingV1Api(kube_cluster.api_client())  # admin
        yield kube


def owners(obj) -> list[str]:
    return [o.uid for o in obj.metadata.owner_references or []]


def test_a_foreign_policy_holding_the_name_blocks_the_job_and_nothing_reaches_kuberay(kube):
    # Another team's object of that name, owned by something of theirs (a ConfigMap here).
    cm = kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": "other-team"}})
    meta = {"name": "g-ray-head",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "other-team", "uid": cm.metadata.uid}]}
    kube.net.create_namespaced_network_policy(kube.ns, {"metadata": meta, "spec": {"podSelector": {}}})
    read, delete = kube.net.read_namespaced_network_policy, kube.net.delete_namespaced_network_policy
    kube.apply(quickstart("g", pvc_store(kube.ns)))

    handlers.reconcile(kube.ns, "g")
    handlers.reconcile(kube.ns, "g")
    assert not kube.rayjobs("g")  # nothing sent to KubeRay
    cond = conditions(kube, "g")["ChildConflict"]
    assert cond["status"] == "True" and f"NetworkPolicy {kube.ns}/g-ray-head" in cond["message"]
    assert "ConfigMap/other-team" in cond["message"] and f"kubectl delete networkpolicies -n {kube.ns} g-ray-head" in cond["message"]
    assert kube.job("g")["status"]["phase"] != "Running"
    assert [r for r, _ in warnings(kube, "g")] == ["ChildConflict"]
    assert owners(read("g-ray-head", kube.ns)) == [cm.metadata.uid]  # left as it was
    # The operator's read brings back metadata only.
    seen = json.loads(kube_api.networking().read_namespaced_network_policy("g-ray-head", kube.ns, _headers=METADATA_ONLY,
                                                                           _preload_content=False).data)
    assert seen["kind"] == "PartialObjectMetadata" and "spec" not in seen

    delete("g-ray-head", kube.ns)  # its owner removes it: the job carries on with its own
    handlers.reconcile(kube.ns, "g")
    kube.wait_rayjob("g-teacher-a1", timeout=5)
    assert owners(read("g-ray-head", kube.ns)) == [kube.job("g")["metadata"]["uid"]]
    assert kube.job("g")["status"]["phase"] == "Running" and "ChildConflict" not in conditions(kube, "g")


def test_the_jobs_policy_deleted_while_a_stage_runs_is_recreated(kube):
    kube.apply(quickstart("d", pvc_store(kube.ns)))
    handlers.reconcile(kube.ns, "d")
    kube.wait_rayjob("d-teacher-a1", timeout=5)
    kube.kuberay_runs("d-teacher-a1")
    handlers.reconcile(kube.ns, "d")  # nothing to create now; the policy found (409) and owned
    uid = kube.job("d")["metadata"]["uid"]

    kube.net.delete_namespaced_network_policy("d-ray-head", kube.ns)
    handlers.reconcile(kube.ns, "d")
    assert owners(kube.net.read_namespaced_network_policy("d-ray-head", kube.ns)) == [uid]
    assert sorted(kube.rayjobs("d")) == ["d-teacher-a1"] and kube.job("d")["status"]["phase"] == "Running"
