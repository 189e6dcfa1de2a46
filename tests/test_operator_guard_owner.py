"""The job's Ray token Secret `<job>-ray-auth` and head NetworkPolicy `<job>-ray-head` are the job's own.

Against the real API server, as the chart's ServiceAccount (kopf left out): a name taken by an object
the job does not own blocks the job (ChildConflict naming it, its owners and the fix) before anything
reaches KubeRay, and leaves that object as it was; the job's own Secret or policy, deleted while a
stage runs, is back after the next reconcile."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from meddistill.operator import handlers, kube_api
from meddistill.operator.backends import kuberay_objects
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


@pytest.mark.parametrize("kind", ["Secret", "NetworkPolicy"])
def test_a_foreign_object_holding_the_name_blocks_the_job_and_nothing_reaches_kuberay(kube, kind):
    # Another team's object of that name, owned by something of theirs (a ConfigMap here).
    cm = kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": "other-team"}})
    meta = {"name": "g-ray-auth" if kind == "Secret" else "g-ray-head",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "other-team", "uid": cm.metadata.uid}]}
    if kind == "Secret":
        kube.core.create_namespaced_secret(kube.ns, {"metadata": meta, "stringData": {"auth_token": "theirs"}})
        read, delete, plural = kube.core.read_namespaced_secret, kube.core.delete_namespaced_secret, "secrets"
    else:
        kube.net.create_namespaced_network_policy(kube.ns, {"metadata": meta, "spec": {"podSelector": {}}})
        read, delete, plural = kube.net.read_namespaced_network_policy, kube.net.delete_namespaced_network_policy, "networkpolicies"
    kube.apply(quickstart("g", pvc_store(kube.ns)))

    handlers.reconcile(kube.ns, "g")
    handlers.reconcile(kube.ns, "g")
    assert not kube.rayjobs("g")  # nothing sent to KubeRay
    cond = conditions(kube, "g")["ChildConflict"]
    assert cond["status"] == "True" and f"{kind} {kube.ns}/{meta['name']}" in cond["message"]
    assert "ConfigMap/other-team" in cond["message"] and f"kubectl delete {plural} -n {kube.ns} {meta['name']}" in cond["message"]
    assert kube.job("g")["status"]["phase"] != "Running"
    assert [r for r, _ in warnings(kube, "g")] == ["ChildConflict"]
    left = read(meta["name"], kube.ns)
    assert owners(left) == [cm.metadata.uid]  # left as it was
    if kind == "Secret":
        assert left.data == {"auth_token": "dGhlaXJz"}
        # The operator's read (its own credentials) brings back the metadata only, never the Secret's data.
        seen = json.loads(kube_api.core().read_namespaced_secret(meta["name"], kube.ns, _headers=METADATA_ONLY,
                                                                 _preload_content=False).data)
        assert seen["kind"] == "PartialObjectMetadata" and "data" not in seen and "theirs" not in json.dumps(seen)

    delete(meta["name"], kube.ns)  # its owner removes it: the job carries on with its own
    handlers.reconcile(kube.ns, "g")
    kube.wait_rayjob("g-teacher-a1", timeout=5)
    assert owners(read(meta["name"], kube.ns)) == [kube.job("g")["metadata"]["uid"]]
    assert kube.job("g")["status"]["phase"] == "Running" and "ChildConflict" not in conditions(kube, "g")


def test_the_jobs_secret_and_policy_deleted_while_a_stage_runs_are_recreated(kube):
    kube.apply(quickstart("d", pvc_store(kube.ns)))
    handlers.reconcile(kube.ns, "d")
    kube.wait_rayjob("d-teacher-a1", timeout=5)
    kube.kuberay_runs("d-teacher-a1")
    handlers.reconcile(kube.ns, "d")  # nothing to create now; both found (409) and owned
    uid = kube.job("d")["metadata"]["uid"]
    token = kube.core.read_namespaced_secret("d-ray-auth", kube.ns).data[kuberay_objects.AUTH_SECRET_KEY]

    kube.core.delete_namespaced_secret("d-ray-auth", kube.ns)
    kube.net.delete_namespaced_network_policy("d-ray-head", kube.ns)
    handlers.reconcile(kube.ns, "d")
    secret = kube.core.read_namespaced_secret("d-ray-auth", kube.ns)
    assert owners(secret) == [uid] and secret.data[kuberay_objects.AUTH_SECRET_KEY] != token  # a new token
    assert owners(kube.net.read_namespaced_network_policy("d-ray-head", kube.ns)) == [uid]
    assert sorted(kube.rayjobs("d")) == ["d-teacher-a1"] and kube.job("d")["status"]["phase"] == "Running"
