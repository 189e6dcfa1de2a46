"""Smoke tests for the real local control plane (tests/support/kube_cluster.py)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support.kube_cluster import OPERATOR_GROUPS, OPERATOR_USER, REPO_ROOT

pytest_plugins = ["tests.support.kube_fixtures"]

pytestmark = pytest.mark.kube


def _wrapper_version(wrapper: str, module: str) -> str:
    text = (REPO_ROOT / "tools" / "kube" / wrapper / "go.mod").read_text()
    m = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)(?:\s*//.*)?$", text, re.M)
    assert m, f"{module} not required in tools/kube/{wrapper}/go.mod"
    return m.group(1)


K8S_VERSION = _wrapper_version("kubernetes", "k8s.io/kubernetes")
HELM_VERSION = _wrapper_version("helm", "helm.sh/helm/v3")
ETCD_VERSION = _wrapper_version("etcd", "go.etcd.io/etcd/server/v3")


def _wait_until(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def namespace(kube_cluster):
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    kube_cluster.kubectl("create", "namespace", name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def test_versions(kube_cluster):
    info = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)
    assert info["clientVersion"]["gitVersion"] == K8S_VERSION
    assert info["serverVersion"]["gitVersion"] == K8S_VERSION
    assert K8S_VERSION.startswith("v1.36.")
    assert (info["serverVersion"]["major"], info["serverVersion"]["minor"]) == ("1", "36")

    helm = kube_cluster.helm("version", "--short").stdout.strip()
    assert helm.startswith(HELM_VERSION), helm
    assert HELM_VERSION.startswith("v3.")

    etcd = subprocess.run([str(kube_cluster.bin("etcd")), "--version"], capture_output=True, text=True,
                          check=True).stdout
    assert f"etcd Version: {ETCD_VERSION.lstrip('v')}" in etcd, etcd


def test_kuberay_crds_established(kube_cluster):
    for crd in ("rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io"):
        obj = json.loads(kube_cluster.kubectl("get", "crd", crd, "-o", "json").stdout)
        conds = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
        assert conds.get("Established") == "True", (crd, conds)
    names = kube_cluster.kubectl("api-resources", "--api-group=ray.io", "-o", "name").stdout.split()
    assert {"rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io"} <= set(names)


def test_rayjob_status_subresource_and_garbage_collection(kube_cluster, namespace):
    from kubernetes import client

    api = kube_cluster.api_client()
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)

    owner = core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owner"}, "data": {"k": "v"}}
    )
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": "smoke",
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": owner.metadata.name,
                "uid": owner.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "entrypoint": "python -c 'print(1)'",
            "shutdownAfterJobFinishes": True,
            "rayClusterSpec": {
                "headGroupSpec": {
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray:2.40.0"}]}},
                },
            },
        },
    }
    created = custom.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", rayjob)
    assert created["metadata"]["ownerReferences"][0]["uid"] == owner.metadata.uid
    assert "status" not in created or not created["status"]

    # What KubeRay v1.7 writes when a job is done, through the /status subresource.
    kube_cluster.kubectl(
        "patch", "rayjob", "smoke", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}),
    )
    got = custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", "smoke")
    assert got["status"]["jobDeploymentStatus"] == "Complete"
    assert got["status"]["jobStatus"] == "SUCCEEDED"
    assert got["spec"]["entrypoint"] == rayjob["spec"]["entrypoint"]

    # A status change through the main resource is ignored (status subresource is on).
    kube_cluster.kubectl(
        "patch", "rayjob", "smoke", "-n", namespace, "--type=merge",
        "-p", json.dumps({"status": {"jobStatus": "FAILED"}}),
    )
    got = custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", "smoke")
    assert got["status"]["jobStatus"] == "SUCCEEDED"

    # Deleting the owner makes kube-controller-manager's garbage collector delete the RayJob.
    core.delete_namespaced_config_map(owner.metadata.name, namespace)

    def rayjob_gone():
        res = kube_cluster.kubectl("get", "rayjob", "smoke", "-n", namespace, "--ignore-not-found", "-o", "name")
        return res.stdout.strip() == ""

    _wait_until(rayjob_gone, 90, "the garbage collector to delete the owned RayJob")


def test_namespace_deletion_finishes(kube_cluster):
    name = f"gone-{uuid.uuid4().hex[:8]}"
    kube_cluster.kubectl("create", "namespace", name)
    kube_cluster.kubectl("create", "configmap", "x", "-n", name, "--from-literal=a=b")
    kube_cluster.kubectl("delete", "namespace", name, "--wait=true", "--timeout=90s", timeout=120)
    res = kube_cluster.kubectl("get", "namespace", name, "--ignore-not-found", "-o", "name")
    assert res.stdout.strip() == ""


def test_operator_token_is_subject_to_rbac(kube_cluster, namespace):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    who = json.loads(kube_cluster.kubectl("auth", "whoami", "-o", "json",
                                          kubeconfig=kube_cluster.operator_kubeconfig).stdout)
    assert who["status"]["userInfo"]["username"] == OPERATOR_USER
    assert set(OPERATOR_GROUPS) <= set(who["status"]["userInfo"]["groups"])

    res = kube_cluster.kubectl("get", "secrets", "-A", kubeconfig=kube_cluster.operator_kubeconfig, check=False)
    assert res.returncode != 0
    assert "Forbidden" in res.stderr and OPERATOR_USER in res.stderr, res.stderr

    core = client.CoreV1Api(kube_cluster.api_client(kube_cluster.operator_kubeconfig))
    with pytest.raises(ApiException) as exc:
        core.list_secret_for_all_namespaces()
    assert exc.value.status == 403

    # ...and RBAC grants work for it: a RoleBinding lets it list secrets in one namespace only.
    kube_cluster.kubectl("create", "role", "read-secrets", "-n", namespace, "--verb=get,list", "--resource=secrets")
    kube_cluster.kubectl("create", "rolebinding", "operator-reads-secrets", "-n", namespace,
                         "--role=read-secrets", f"--user={OPERATOR_USER}")
    _wait_until(
        lambda: kube_cluster.kubectl("get", "secrets", "-n", namespace,
                                     kubeconfig=kube_cluster.operator_kubeconfig, check=False).returncode == 0,
        30, "the RoleBinding to take effect",
    )
    assert core.list_namespaced_secret(namespace).items is not None
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_secret("default")
    assert exc.value.status == 403


def test_helm_talks_to_the_cluster(kube_cluster, namespace):
    res = kube_cluster.helm("list", "-n", namespace, "-o", "json")
    assert json.loads(res.stdout) == []
