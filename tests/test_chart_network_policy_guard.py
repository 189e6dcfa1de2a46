"""The chart's NetworkPolicy guard on a real API server: the operator's ServiceAccount, which RBAC lets
create NetworkPolicies in every namespace, may create only its own `<job>-ray-head` policies.

Written as the attack: someone holding the operator's token tries to open a database in another
namespace to the whole cluster; the operator's own policy (rendered by kuberay_objects) still goes
through, and everyone else's NetworkPolicies are none of the guard's business."""
from __future__ import annotations

import json
import uuid

import pytest
import yaml

from meddistill.operator.backends import kuberay_objects
from meddistill.spec.models import MedDistillJob
from tests.support.kube_cluster import OPERATOR_USER
from tests.test_operator_kube import install_operator_prereqs, quickstart, wait_for

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


def _as_operator() -> list[str]:
    # Impersonated with full rights: the policy alone must refuse, not RBAC.
    return [f"--as={OPERATOR_USER}", "--as-group=system:masters"]


def _policy(name: str, ns: str, selector: dict, **extra) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, **extra.pop("metadata", {})},
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {}}]}], **extra}}


@pytest.fixture
def ns(kube_cluster):
    install_operator_prereqs(kube_cluster)  # the chart as the operator tests install it: the guard included
    name = f"npg-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false")


def test_the_operators_token_cannot_open_other_pods_but_creates_its_own_head_policy(kube_cluster, ns):
    def create(body: dict, *who: str):
        return kube_cluster.kubectl("create", "--dry-run=server", "-f", "-", *who, input=yaml.safe_dump(body), check=False)

    open_db = _policy("allow-all", ns, {"app": "patient-db"})
    res = wait_for(lambda: (r := create(open_db, *_as_operator())).returncode != 0 and r, 30,
                   "the admission policy to refuse the operator's token opening a database", interval=1)
    assert "may create only `<job>-ray-head` NetworkPolicies" in res.stderr, res.stderr

    # A real job, and the policy the operator renders for it: admitted.
    doc = quickstart("ward", "pvc://artifacts/x")
    doc["metadata"]["namespace"] = ns
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    uid = json.loads(kube_cluster.kubectl("get", "mdj", "ward", "-n", ns, "-o", "json").stdout)["metadata"]["uid"]
    job = MedDistillJob.model_validate(doc)
    own = kuberay_objects.head_network_policy(job, uid)
    assert create(own, *_as_operator()).returncode == 0

    # Its name and owner, but selecting other pods; or with egress; or unowned: refused.
    wider = json.loads(json.dumps(own))
    wider["spec"]["podSelector"] = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["patient-db"]}]}
    egress = json.loads(json.dumps(own))
    egress["spec"].update(policyTypes=["Ingress", "Egress"], egress=[{}])
    unowned = json.loads(json.dumps(own))
    del unowned["metadata"]["ownerReferences"]
    for body, says in ((wider, "<job>-ray-head"), (egress, "only Ingress"), (unowned, "owned by its MedDistillJob")):
        res = create(body, *_as_operator())
        assert res.returncode != 0 and says in res.stderr, (says, res.stderr)

    # Anyone else (the namespace's admin) writes whatever NetworkPolicy they like.
    assert create(open_db).returncode == 0
