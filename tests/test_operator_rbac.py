"""Least privilege: the chart's namespaced Role is enough, and one rule less is not."""

from __future__ import annotations

import time
import uuid

import pytest
import yaml

from tests.support.kube_cluster import OPERATOR_NAMESPACE
from tests.test_operator_kube import CHART, Kube, OperatorProcess, install_operator_prereqs, pvc_store, quickstart, wait_for

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


def namespaced_rbac(cluster, namespace: str, drop_verb: tuple[str, str] | None = None) -> str:
    """The chart's Role for one namespace, optionally without one verb on one resource."""
    rendered = cluster.helm("template", "meddistill", str(CHART), "--namespace", OPERATOR_NAMESPACE,
                            "--set", "rbac.scope=namespace", "--set", f"watchNamespace={namespace}",
                            "--show-only", "templates/rbac.yaml").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    if drop_verb:
        resource, verb = drop_verb
        role = next(d for d in docs if d["kind"] == "Role")
        for rule in role["rules"]:
            if resource in rule["resources"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != verb]
        role["rules"] = [r for r in role["rules"] if r["verbs"]]  # a rule needs a verb
    return yaml.safe_dump_all(docs)


def test_namespaced_role_suffices_and_dropping_a_rule_breaks_it(kube_cluster, tmp_path):
    install_operator_prereqs(kube_cluster)
    # Only the namespaced Role may authorize the operator in this test.
    kube_cluster.kubectl("delete", "clusterrolebinding", "meddistill-meddistill-operator", "--ignore-not-found")
    ns = f"rbac-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", ns)
    kube = Kube(kube_cluster, ns)
    kube_cluster.kubectl("apply", "-f", "-", input=namespaced_rbac(kube_cluster, ns, drop_verb=("rayjobs", "create")))
    op = OperatorProcess(kube_cluster, tmp_path / "operator.log", namespace=ns).start()
    try:
        kube.apply(quickstart("rbac", pvc_store(ns)))
        wait_for(lambda: "403 Forbidden: cannot create RayJob" in op.log(), 20, "the operator to log the 403")
        assert not kube.rayjobs("rbac")  # the job does not progress

        kube_cluster.kubectl("apply", "-f", "-", input=namespaced_rbac(kube_cluster, ns))
        kube.wait_rayjob("rbac-teacher-a1", timeout=30)  # the full Role is enough (resync picks it up)
        # The status of the 403 (ReconcileBlocked) may still be there when the RayJob appears.
        st = wait_for(lambda: (s := kube.job("rbac").get("status", {})).get("phase") == "Running" and s, 20, "phase Running")
        assert st["currentStage"] == "teacher"
    finally:
        op.stop()
        install_operator_prereqs(kube_cluster)  # restore the cluster-wide binding for later tests
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_children_need_the_finalizers_rule_under_owner_reference_enforcement(kube_cluster, tmp_path):
    """The API server runs OwnerReferencesPermissionEnforcement (as OpenShift does): a RayJob with
    blockOwnerDeletion is refused unless the operator may update meddistilljobs/finalizers."""
    install_operator_prereqs(kube_cluster)
    kube_cluster.kubectl("delete", "clusterrolebinding", "meddistill-meddistill-operator", "--ignore-not-found")
    ns = f"rbacfin-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", ns)
    kube = Kube(kube_cluster, ns)
    kube_cluster.kubectl("apply", "-f", "-",
                         input=namespaced_rbac(kube_cluster, ns, drop_verb=("meddistilljobs/finalizers", "update")))
    op = OperatorProcess(kube_cluster, tmp_path / "operator.log", namespace=ns).start()
    try:
        kube.apply(quickstart("fin", pvc_store(ns)))
        # The admission's own words reach the log: the cause, not just "403".
        wait_for(lambda: "blockOwnerDeletion" in op.log(), 20, "the operator to log the admission's 403")
        assert not kube.rayjobs("fin")

        # The two Roles differ only in the finalizers rule: it alone lets the same create through.
        kube_cluster.kubectl("apply", "-f", "-", input=namespaced_rbac(kube_cluster, ns))
        kube.wait_rayjob("fin-teacher-a1", timeout=30)
    finally:
        op.stop()
        install_operator_prereqs(kube_cluster)
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false")
