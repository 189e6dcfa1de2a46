"""Who decides where the operator sends tokens and Secrets: the platform team's list of Ray clusters.

A job names a listed cluster; an unlisted cluster or address is a condition and not one byte leaves
the operator (a local listener records every connection). Each cluster's token goes only to its own
address, over https unless its entry allows otherwise, never the operator's environment's.
Real kube-apiserver with the chart's RBAC, the reconcile in this process as the operator's
ServiceAccount (as tests/test_operator_blocked.py); the Ray head itself is in test_raycluster_backend.py.
"""

from __future__ import annotations

import os

import socket
import threading
import uuid

import pytest
import yaml
from pydantic import ValidationError

from meddistill.operator import handlers
from meddistill.operator.backends import ray_clusters, raycluster
from meddistill.operator.backends.ray_clusters import AllowedCluster, AllowedClusters, TokenSecret
from meddistill.operator.failures import ReconcileBlocked
from meddistill.spec.models import MedDistillJob
from tests.support.kube_cluster import OPERATOR_NAMESPACE
from tests.test_operator_blocked import as_operator, conditions, kube, warnings  # noqa: F401 - fixtures
from tests.test_operator_kube import CHART, quickstart

pytest_plugins = ["tests.support.kube_fixtures"]


class Listener:
    """A TCP port that records every connection (and the request head sent on it), then closes it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.address = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    self.requests.append(b"")

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture
def allowed(monkeypatch):
    """Sets the operator's list of Ray clusters for one test."""
    def configure(*clusters: AllowedCluster, default: str = "") -> None:
        monkeypatch.setattr(ray_clusters, "ALLOWED", AllowedClusters(clusters=list(clusters), default=default))
    return configure


# --------------------------------------------------------------------------------------------
# The list itself (no cluster needed)
# --------------------------------------------------------------------------------------------


def test_a_token_over_plain_http_is_refused_unless_the_entry_allows_it(tmp_path):
    path = tmp_path / "clusters.yaml"
    entry = {"name": "shared", "address": "http://ray:8265", "tokenSecret": {"name": "ray-token"}}
    path.write_text(yaml.safe_dump({"clusters": [entry]}))
    with pytest.raises(ValidationError, match="sent in clear text.*https://.*allowInsecure: true"):
        ray_clusters.load(path, "ops")
    path.write_text(yaml.safe_dump({"clusters": [{**entry, "allowInsecure": True}]}))
    loaded = ray_clusters.load(path, "ops")
    assert loaded.clusters[0].token_secret == TokenSecret(name="ray-token", key="token", namespace="ops")  # the operator's
    path.write_text(yaml.safe_dump({"clusters": [{**entry, "address": "https://ray:8265"}], "default": "other"}))
    with pytest.raises(ValidationError, match="default Ray cluster 'other' is not listed"):
        ray_clusters.load(path, "ops")


@pytest.mark.parametrize("env_address", [None, "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"])
def test_each_cluster_gets_its_own_token_never_the_operators_environment(listener, monkeypatch, env_address):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "operator-env-token")
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    if env_address:  # Ray's client would take this over the listed address, token and all
        monkeypatch.setenv(env_address, "http://127.0.0.1:9")
    c = raycluster.RayCluster(AllowedCluster(name="a", address=listener.address, allow_insecure=True,
                                             token_secret=TokenSecret(name="t", namespace="ops")), token="cluster-a-token")
    with pytest.raises(ReconcileBlocked, match="Ray cluster 'a'"):
        c.jobs()
    sent = b"".join(listener.requests).decode(errors="replace")
    assert "Authorization: Bearer cluster-a-token" in sent and "operator-env-token" not in sent
    if env_address:
        assert os.environ[env_address] == "http://127.0.0.1:9"  # left as it was


# --------------------------------------------------------------------------------------------
# Through the reconcile, against the real API server
# --------------------------------------------------------------------------------------------


@pytest.mark.kube
@pytest.mark.parametrize("ray", ["address", "cluster"])
def test_an_unlisted_cluster_is_a_condition_and_nothing_is_sent(kube, tmp_path, listener, allowed, ray):  # noqa: F811
    allowed(AllowedCluster(name="shared", address="https://ray.example:8265"))
    kube.cluster.kubectl("-n", kube.ns, "create", "secret", "generic", "creds", "--from-literal=AWS_SECRET_ACCESS_KEY=shh")
    doc = quickstart("rogue", str(tmp_path), ray={"address": listener.address} if ray == "address" else {"cluster": "mine"})
    doc["spec"]["artifacts"]["secretName"] = "creds"
    kube.apply(doc)

    handlers.reconcile(kube.ns, "rogue")
    cond = conditions(kube, "rogue")["RayClusterUnavailable"]
    assert cond["status"] == "True" and f"spec.ray.{ray}" in cond["message"] and "listed: shared" in cond["message"]
    assert "rayClusters" in cond["message"]  # the fix: a listed name, or the platform team lists it
    assert [r for r, _ in warnings(kube, "rogue")] == ["RayClusterUnavailable"]
    assert listener.requests == []  # no token, no Secret, not even a connection
    assert not kube.rayjobs("rogue")  # and no fallback to KubeRay either


def test_a_listed_address_is_the_listed_cluster(allowed):
    shared = AllowedCluster(name="shared", address="https://ray.example:8265/")
    allowed(shared)
    job = MedDistillJob.model_validate(quickstart("j", "/runs", ray={"address": "https://ray.example:8265"}))
    assert ray_clusters.for_job(job) == shared
    assert ray_clusters.for_job(MedDistillJob.model_validate(quickstart("j", "/runs"))) is None  # KubeRay
    allowed(shared, default="shared")
    assert ray_clusters.for_job(MedDistillJob.model_validate(quickstart("j", "/runs"))) == shared


def test_a_cluster_listed_for_some_namespaces_refuses_jobs_from_others(allowed, tmp_path):
    path = tmp_path / "clusters.yaml"
    path.write_text(yaml.safe_dump({"clusters": [{"name": "oncology", "address": "https://ray.onc:8265",
                                                  "namespaces": ["team-onc"]}], "default": "oncology"}))
    listed = ray_clusters.load(path, "ops")
    allowed(*listed.clusters, default=listed.default)
    own = {"name": "j", "namespace": "team-onc"}
    assert ray_clusters.for_job(MedDistillJob.model_validate({**quickstart("j", "/runs"), "metadata": own})).single_tenant
    for ray in ({"cluster": "oncology"}, {"address": "https://ray.onc:8265"}, {}):  # named, by address, by default
        other = MedDistillJob.model_validate({**quickstart("j", "/runs", ray=ray), "metadata": {"name": "j", "namespace": "team-b"}})
        with pytest.raises(ReconcileBlocked, match=r"'oncology' takes jobs from namespaces team-onc only, not from "
                                                   r"namespace 'team-b'.*rayClusters\[\]\.namespaces") as e:
            ray_clusters.for_job(other)
        assert e.value.reason == "RayClusterUnavailable"


@pytest.mark.kube
def test_the_token_is_read_from_the_operators_namespace_by_name_only_and_again_when_rotated(kube_cluster, as_operator,  # noqa: F811
                                                                                            monkeypatch):
    token_name = f"ray-token-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("-n", OPERATOR_NAMESPACE, "create", "secret", "generic", token_name, "--from-literal=token=s3cr3t")
    kube_cluster.kubectl("-n", OPERATOR_NAMESPACE, "create", "secret", "generic", token_name + "-other", "--from-literal=token=x")
    rendered = kube_cluster.helm("template", "meddistill", str(CHART), "--namespace", OPERATOR_NAMESPACE,
                                 "--set", "rayClusters[0].name=shared", "--set", "rayClusters[0].address=https://r:8265",
                                 "--set", f"rayClusters[0].tokenSecret.name={token_name}",
                                 "--show-only", "templates/ray-clusters.yaml").stdout
    rbac = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in ("Role", "RoleBinding")]
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))

    def cluster(secret: str) -> raycluster.RayCluster:
        return raycluster.RayCluster(AllowedCluster(name="shared", address="https://r:8265",
                                                    token_secret=TokenSecret(name=secret, namespace=OPERATOR_NAMESPACE)))

    shared = cluster(token_name)
    assert shared.headers() == {"Authorization": "Bearer s3cr3t"}
    with pytest.raises(ReconcileBlocked, match="HTTP 403"):  # the chart grants exactly the listed token Secrets
        cluster(token_name + "-other").headers()

    # The platform team rotates the token: read again after TOKEN_REFRESH_S, no operator restart; the
    # Jobs and Serve clients built with the old header are dropped (rebuilt on next use).
    kube_cluster.kubectl("-n", OPERATOR_NAMESPACE, "patch", "secret", token_name, "--type=merge",
                         "-p", '{"stringData": {"token": "r0tated"}}')
    shared._client = shared._serve = object()
    assert shared.headers() == {"Authorization": "Bearer s3cr3t"}  # within TOKEN_REFRESH_S: the cached one
    monkeypatch.setattr(raycluster, "TOKEN_REFRESH_S", 0.0)
    assert shared.headers() == {"Authorization": "Bearer r0tated"} and shared._client is None and shared._serve is None


def job_secrets_rbac(kube_cluster, namespace: str) -> str:
    """The chart's Role and RoleBinding letting the operator list Secrets in one namespace it serves."""
    rendered = kube_cluster.helm("template", "meddistill", str(CHART), "--namespace", OPERATOR_NAMESPACE,
                                 "--set", "rayClusters[0].name=shared", "--set", "rayClusters[0].address=https://r:8265",
                                 "--set", f"ray.secretNamespaces={{{namespace}}}",
                                 "--show-only", "templates/ray-clusters.yaml").stdout
    return yaml.safe_dump_all([d for d in yaml.safe_load_all(rendered) if d and d["kind"] in ("Role", "RoleBinding")])


@pytest.mark.kube
def test_only_secrets_labelled_for_meddistill_are_read(kube_cluster, kube):  # noqa: F811
    job = MedDistillJob.model_validate({**quickstart("j", "s3://bucket/runs"), "metadata": {"name": "j", "namespace": kube.ns}})
    job.spec.artifacts.secret_name = "creds"
    kube_cluster.kubectl("-n", kube.ns, "create", "secret", "generic", "creds", "--from-literal=AWS_SECRET_ACCESS_KEY=sh-value")

    own = AllowedCluster(name="own", address="https://ray.team:8265", namespaces=[kube.ns])
    shared = AllowedCluster(name="shared", address="https://ray.shared:8265")
    # A cluster any namespace may use: Ray would show the values to its other tenants; refused, nothing read.
    with pytest.raises(ReconcileBlocked, match=r"'shared' is shared \(any namespace\).*rayClusters\[\]\.namespaces") as e:
        raycluster.job_secret_env(job, serving=False, cluster=shared)
    assert e.value.reason == "SecretUnavailable"
    with pytest.raises(ReconcileBlocked, match=r"may not list Secrets in namespace .*ray.secretNamespaces"):
        raycluster.job_secret_env(job, serving=False, cluster=own)  # a namespace the chart does not serve
    kube_cluster.kubectl("apply", "-f", "-", input=job_secrets_rbac(kube_cluster, kube.ns))

    with pytest.raises(ReconcileBlocked) as refused:
        raycluster.job_secret_env(job, serving=False, cluster=own)
    assert refused.value.reason == "SecretUnavailable" and "spec.artifacts.secretName" in str(refused.value)
    assert f"kubectl -n {kube.ns} label secret creds meddistill.io/inject=true" in str(refused.value)
    assert "sh-value" not in str(refused.value)

    kube_cluster.kubectl("-n", kube.ns, "label", "secret", "creds", "meddistill.io/inject=true")
    assert raycluster.job_secret_env(job, serving=False, cluster=own) == {"AWS_SECRET_ACCESS_KEY": "sh-value"}

