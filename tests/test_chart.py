"""The Helm chart: lint, schema, and every rendered object accepted by a real API server."""

from __future__ import annotations

import pytest
import yaml

from tests.support.kube_cluster import OPERATOR_NAMESPACE
from tests.test_operator_kube import CHART, install_crd

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


def test_helm_lint_is_clean(kube_cluster):
    res = kube_cluster.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in res.stdout and "[WARNING]" not in res.stdout, res.stdout


@pytest.mark.parametrize("values", [[], ["rbac.scope=namespace", "watchNamespace=team-a", "artifactClaims={models}",
                                         "artifactSecretName=s3-creds", "logLevel=debug",
                                         "ray.address=http://ray-head.ray.svc:8265", "ray.authTokenSecret.name=ray-token"]])
def test_template_passes_server_dry_run(kube_cluster, values):
    install_crd(kube_cluster)
    kube_cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    kube_cluster.kubectl("create", "namespace", "team-a", check=False)
    args = sum((["--set", v] for v in values), [])
    rendered = kube_cluster.helm("template", "dry", str(CHART), "--namespace", OPERATOR_NAMESPACE, *args).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    want_role = "Role" if values else "ClusterRole"
    assert {"ServiceAccount", "Deployment", "Service", want_role} <= set(kinds)
    out = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered).stdout
    assert "(server dry run)" in out

    role = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == want_role)
    # Secrets are read only for the Ray-cluster backend (ray.address here), never for KubeRay alone.
    assert any("secrets" in r["resources"] for r in role["rules"]) == bool(values)
    deploy = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["resources"]["limits"]
    if values:
        assert "--namespace=team-a" in c["args"] and c["args"][0] == "--verbose"
        assert "--ray-address=http://ray-head.ray.svc:8265" in c["args"]
        token = next(e for e in c["env"] if e["name"] == "RAY_AUTH_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "ray-token", "key": "token"}
        assert {"name": "artifacts-models", "mountPath": "/mnt/pvc/models", "readOnly": True} in c["volumeMounts"]


def test_read_secrets_grants_get_on_secrets_and_nothing_more(kube_cluster):
    rendered = kube_cluster.helm("template", "x", str(CHART), "--set", "ray.readSecrets=true",
                                 "--show-only", "templates/rbac.yaml").stdout
    role = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ClusterRole")
    assert [r["verbs"] for r in role["rules"] if "secrets" in r["resources"]] == [["get"]]


def test_values_schema_refuses_bad_scope(kube_cluster):
    res = kube_cluster.helm("template", "x", str(CHART), "--set", "rbac.scope=everything", check=False)
    assert res.returncode != 0 and "/rbac/scope" in res.stderr and "'cluster', 'namespace'" in res.stderr, res.stderr
