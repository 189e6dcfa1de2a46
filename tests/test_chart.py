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


@pytest.mark.parametrize("values", [[], ["rbac.scope=namespace", "watchNamespace=team-a", "artifactClaims[0].namespace=team-a",
                                         "artifactClaims[0].claim=models", "artifactClaims[0].operatorClaim=team-a-models",
                                         "artifactSecretName=s3-creds", "logLevel=debug",
                                         "rayClusters[0].name=shared", "rayClusters[0].address=https://ray-head.ray.svc:8265",
                                         "rayClusters[0].tokenSecret.name=ray-token", "ray.defaultCluster=shared",
                                         "imagePullSecrets[0].name=regcred"]])
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

    docs = [d for d in yaml.safe_load_all(rendered) if d]
    role = next(d for d in docs if d["kind"] == want_role and d["metadata"]["name"] == "dry-meddistill-operator")
    reads = {"get", "list", "watch"}
    # No Secret verb of its own: KubeRay makes each Ray cluster's token Secret (a cluster-wide create would
    # let the ServiceAccount mint a token for any ServiceAccount).
    assert [r["verbs"] for r in role["rules"] if "secrets" in r["resources"]] == []
    if not values:  # the default chart: no create or list on Secrets anywhere
        assert not [(d["kind"], r["verbs"]) for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]
                    if "secrets" in r["resources"] or "*" in r["resources"]]
    secret_rules = {(d["metadata"].get("namespace"), tuple(r.get("resourceNames") or ()), tuple(r["verbs"]))
                    for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]
                    if "secrets" in r["resources"] and reads & set(r["verbs"])}
    # Ray clusters listed: the token Secret by name in the operator's namespace, and listing (the operator
    # filters by the consent label) in the namespace it serves; nothing cluster-wide.
    assert secret_rules == ({(OPERATOR_NAMESPACE, ("ray-token",), ("get",)), ("team-a", (), ("list",))} if values else set())
    deploy = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["resources"]["limits"]
    if values:
        assert "--namespace=team-a" in c["args"] and c["args"][0] == "--verbose"
        assert "--ray-clusters=/etc/meddistill/ray-clusters.yaml" in c["args"]
        assert not any(e["name"].startswith("RAY_AUTH") for e in c["env"])  # tokens go per cluster, never via env
        listed = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["ray-clusters.yaml"])
        assert listed == {"default": "shared", "clusters": [
            {"name": "shared", "address": "https://ray-head.ray.svc:8265", "tokenSecret": {"name": "ray-token"}}]}
        assert {"name": "artifacts-0", "mountPath": "/mnt/pvc/team-a/models", "readOnly": True} in c["volumeMounts"]


def test_job_secrets_are_listable_only_in_the_namespaces_served_unless_cluster_wide_is_asked_for(kube_cluster):
    base = ["--set", "rayClusters[0].name=shared", "--set", "rayClusters[0].address=https://r:8265"]

    def secret_access(*extra):
        rendered = kube_cluster.helm("template", "x", str(CHART), *base, *extra).stdout
        return sorted((d["kind"], d["metadata"].get("namespace", "")) for d in yaml.safe_load_all(rendered)
                      if d and d["kind"] in ("Role", "ClusterRole")
                      and any("secrets" in r["resources"] for r in d["rules"]))

    assert secret_access() == []  # the default: no Secret access at all
    assert secret_access("--set", "ray.secretNamespaces={team-a,team-b}") == [("Role", "team-a"), ("Role", "team-b")]
    assert secret_access("--set", "ray.secretsClusterWide=true") == [("ClusterRole", "")]
    refused = kube_cluster.helm("template", "x", str(CHART), "--set", "rayClusters[0].name=x", check=False)
    assert refused.returncode != 0 and "address" in refused.stderr, refused.stderr


def test_values_schema_refuses_bad_scope(kube_cluster):
    res = kube_cluster.helm("template", "x", str(CHART), "--set", "rbac.scope=everything", check=False)
    assert res.returncode != 0 and "/rbac/scope" in res.stderr and "'cluster', 'namespace'" in res.stderr, res.stderr


def test_kuberay_namespaces_reach_the_operator_and_so_the_head_network_policy(kube_cluster):
    """The chart's kuberayNamespaces become MEDDISTILL_KUBERAY_NAMESPACES, which the KubeRay backend puts in
    each job's head NetworkPolicy; unset, the variable is absent (KubeRay's pods in any namespace)."""
    import yaml

    from meddistill.operator.backends.kuberay import KUBERAY_NAMESPACES_ENV

    def env(*args):
        rendered = kube_cluster.helm("template", "x", str(CHART), *args).stdout
        deploy = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
        return {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert KUBERAY_NAMESPACES_ENV not in env()
    assert env("--set", "kuberayNamespaces={kuberay-system,ray}")[KUBERAY_NAMESPACES_ENV] == "kuberay-system,ray"
    refused = kube_cluster.helm("template", "x", str(CHART), "--set", "kuberayNamespaces={Bad_NS}", check=False)
    assert refused.returncode != 0 and "kuberayNamespaces" in refused.stderr


def test_image_pull_secrets_reach_the_operator_for_the_pods_running_its_image(kube_cluster):
    """The chart's imagePullSecrets go to the operator's pod and, as MEDDISTILL_IMAGE_PULL_SECRETS, to the
    operator, which gives them to the stage and serving pods running its image (test_planner_kuberay.py)."""
    from meddistill.operator.backends.kuberay_objects import IMAGE_PULL_SECRETS_ENV

    def pod(*args):
        rendered = kube_cluster.helm("template", "x", str(CHART), *args).stdout
        return next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]

    assert IMAGE_PULL_SECRETS_ENV not in {e["name"] for e in pod()["containers"][0]["env"]}
    spec = pod("--set", "imagePullSecrets[0].name=regcred", "--set", "imagePullSecrets[1].name=mirror")
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env[IMAGE_PULL_SECRETS_ENV] == "regcred,mirror"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    refused = kube_cluster.helm("template", "x", str(CHART), "--set", "imagePullSecrets[0].name=a\\,b", check=False)
    assert refused.returncode != 0 and "imagePullSecrets" in refused.stderr  # a comma would split the name
