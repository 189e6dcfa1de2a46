"""The chart's gate-override admission policy on a real API server: an override annotation is admitted
only when the NAME it records is the user who writes it, so status.gate.overriddenBy is not free text.

Written as the attack: bob, who may edit the job, records an override in alice's name."""
from __future__ import annotations

import uuid

import pytest
import yaml

from meddistill.gate import OVERRIDE_ANNOTATION
from tests.test_operator_kube import CHART, install_crd, quickstart, wait_for

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


def _as(user: str) -> list[str]:
    # Impersonated with full rights: the policy alone must refuse, not RBAC.
    return [f"--as={user}", "--as-group=system:masters"]


@pytest.fixture
def policy(kube_cluster):
    """The chart's policy and binding, applied for this test only (it is cluster-wide, and other tests'
    admin user writes overrides in other names)."""
    install_crd(kube_cluster)
    rendered = kube_cluster.helm("template", "gate", str(CHART), "--namespace", "meddistill-system").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"].startswith("ValidatingAdmissionPolicy")
            and d["metadata"]["name"].endswith("-gate-override")]  # not the chart's other policy (networkPolicyGuard)
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    text = yaml.safe_dump_all(docs)
    kube_cluster.kubectl("apply", "-f", "-", input=text)
    ns = f"gate-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        yield ns
    finally:
        kube_cluster.kubectl("delete", "-f", "-", "--wait=true", input=text)
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false")


def _job(name: str, override: str | None) -> str:
    doc = quickstart(name, "/srv/runs")
    if override is not None:
        doc["metadata"]["annotations"] = {OVERRIDE_ANNOTATION: override}
    return yaml.safe_dump(doc)


def _annotate(kube_cluster, ns: str, name: str, user: str, value: str):
    return kube_cluster.kubectl("annotate", "--overwrite", "-n", ns, "mdj", name, f"{OVERRIDE_ANNOTATION}={value}",
                                *_as(user), check=False)


def test_an_override_in_someone_elses_name_is_refused_naming_the_fix(kube_cluster, policy):
    ns = policy
    # The policy takes effect a moment after it is created: wait until bob's forged create is refused.
    def refused():
        res = kube_cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", *_as("bob"),
                                   input=_job("forged", "alice: reviewed the failures"), check=False)
        return res if res.returncode != 0 else None
    res = wait_for(refused, 30, "the admission policy to refuse a forged override", interval=1)
    assert 'meddistill.io/gate-override must name the user who sets it: write "bob: REASON"' in res.stderr, res.stderr

    # In one's own name: admitted, and the record is the authenticated user.
    kube_cluster.kubectl("create", "-n", ns, "-f", "-", *_as("alice"), input=_job("signed", "alice: reviewed the failures"))
    # Bob edits something else on that job: the unchanged annotation passes (so do status writes, kopf's own).
    kube_cluster.kubectl("label", "-n", ns, "mdj", "signed", "ward=cardiology", *_as("bob"))
    # Bob rewrites alice's override, or adds one in her name to a job without one: refused.
    assert _annotate(kube_cluster, ns, "signed", "bob", "alice: a different reason").returncode != 0
    kube_cluster.kubectl("create", "-n", ns, "-f", "-", *_as("bob"), input=_job("plain", None))
    forged = _annotate(kube_cluster, ns, "plain", "bob", "alice: looks fine")
    assert forged.returncode != 0 and "bob: REASON" in forged.stderr, forged.stderr
    # Bob in his own name: admitted; removing an override needs no name.
    assert _annotate(kube_cluster, ns, "plain", "bob", " bob: read every wrong answer").returncode == 0
    kube_cluster.kubectl("annotate", "-n", ns, "mdj", "signed", f"{OVERRIDE_ANNOTATION}-", *_as("bob"))
    got = yaml.safe_load(kube_cluster.kubectl("get", "-n", ns, "mdj", "plain", "-o", "yaml").stdout)
    assert got["metadata"]["annotations"][OVERRIDE_ANNOTATION] == " bob: read every wrong answer"


def test_the_policy_can_be_left_out(kube_cluster):
    rendered = kube_cluster.helm("template", "gate", str(CHART), "--set", "gateOverridePolicy.enabled=false").stdout
    assert "gate-override" not in rendered and "ValidatingAdmissionPolicy" in rendered  # networkPolicyGuard's stays
