"""KubeRay child clusters run with Ray token authentication, and only the job's own pods and the
KubeRay operator reach their heads' Ray ports; Serve's port stays open to the namespace.

Against the real API server, as the chart's ServiceAccount: the operator asks KubeRay for token auth
(`authOptions`, KubeRay makes each cluster's token Secret: tests/test_kuberay_controller.py), holds no
Secret permission itself, and creates the NetworkPolicy (owned by the job); the API server admits
them and the RayJob/RayService that use them."""

from __future__ import annotations

import pytest
from kubernetes import client

from meddistill.operator import handlers
from meddistill.operator.backends import kuberay_objects
from meddistill.operator.planner import Serve
from meddistill.spec.models import MedDistillJob
from tests.support.kube_cluster import OPERATOR_USER
from tests.support.operator_inprocess import as_operator, fresh_namespace  # noqa: F401 - fixture
from tests.test_operator_kube import pvc_store, quickstart

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


@pytest.fixture
def kube(kube_cluster, as_operator):
    with fresh_namespace(kube_cluster, "auth") as kube:
        yield kube


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pods(cluster_spec: dict) -> dict[str, dict]:
    """The labels KubeRay gives each kind of pod: the template's plus its node type."""
    return {"head": {**cluster_spec["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"},
            "worker": {**cluster_spec["workerGroupSpecs"][0]["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}}


def test_child_clusters_ask_kuberay_for_token_auth_and_a_policy_closes_the_heads_ray_ports(kube):
    kube.apply(quickstart("auth", pvc_store(kube.ns)))
    handlers.reconcile(kube.ns, "auth")
    rayjob = kube.wait_rayjob("auth-teacher-a1", timeout=5)
    uid = kube.job("auth")["metadata"]["uid"]

    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}  # KubeRay makes the cluster's token Secret
    assert kube.core.list_namespaced_secret(kube.ns).items == []  # as admin: the operator made none
    for verb in ("create", "get", "list"):  # and cannot: no Secret verb in its ServiceAccount's roles
        can = kube.cluster.kubectl("auth", "can-i", verb, "secrets", "-n", kube.ns, f"--as={OPERATOR_USER}", check=False)
        assert can.stdout.strip() == "no", (verb, can.stdout, can.stderr)

    policy = client.NetworkingV1Api(kube.cluster.api_client()).read_namespaced_network_policy("auth-ray-head", kube.ns)
    policy = client.ApiClient().sanitize_for_serialization(policy)
    assert [o["uid"] for o in policy["metadata"]["ownerReferences"]] == [uid]
    spec, labels = policy["spec"], pods(cluster)
    # the job's head and its workers (Serve runs a proxy on each node), nothing else
    assert selects(spec["podSelector"], labels["head"]) and selects(spec["podSelector"], labels["worker"])
    assert spec["podSelector"] == {"matchLabels": {"meddistill.io/job": "auth"}}
    assert spec["policyTypes"] == ["Ingress"]
    own, kuberay, serve = spec["ingress"]
    # Any port from the job's own pods (its workers and submitter carry the job label) ...
    assert "ports" not in own and [p["podSelector"]["matchLabels"] for p in own["from"]] == [{"meddistill.io/job": "auth"}]
    submitter = rayjob["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert selects(own["from"][0]["podSelector"], labels["worker"]) and selects(own["from"][0]["podSelector"], submitter)
    # ... the dashboard from KubeRay's operator, Serve from the namespace; 6379 and 10001 from nobody else.
    assert [p["port"] for p in kuberay["ports"]] == [8265]
    assert kuberay["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    assert [p["port"] for p in serve["ports"]] == [8000] and serve["from"] == [{"podSelector": {}}]

    handlers.reconcile(kube.ns, "auth")  # a later reconcile finds both (409) and carries on
    assert kube.job("auth")["status"]["phase"] == "Running"


def test_the_rayservice_runs_with_the_token_too_and_the_api_server_admits_it(kube):
    doc = quickstart("svc", pvc_store(kube.ns))
    job = MedDistillJob.model_validate({**doc, "metadata": {"name": "svc", "namespace": kube.ns}})
    body = kuberay_objects.rayservice(job, "some-uid", Serve("svc", pvc_store(kube.ns) + "/quantize"))
    cluster = body["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    policy = kuberay_objects.head_network_policy(job, "some-uid", ("ray-system",))
    assert selects(policy["spec"]["podSelector"], pods(cluster)["head"])
    del body["metadata"]["ownerReferences"], policy["metadata"]["ownerReferences"]  # no such job: dry-run the shapes
    kube.custom.create_namespaced_custom_object("ray.io", "v1", kube.ns, "rayservices", body, dry_run="All")
    client.NetworkingV1Api(kube.cluster.api_client()).create_namespaced_network_policy(kube.ns, policy, dry_run="All")
