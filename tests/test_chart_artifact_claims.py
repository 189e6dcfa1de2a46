"""The chart mounts each namespace's pvc:// claim for the operator at /mnt/pvc/NAMESPACE/CLAIM
(operator/stage_artifacts.operator_dir reads it there), and refuses the old one-name form."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.test_operator_kube import CHART

pytest_plugins = ["tests.support.kube_fixtures"]


@pytest.fixture
def helm_template(kube_binaries, tmp_path):
    env = {f"HELM_{d}_HOME": str(tmp_path / d) for d in ("CACHE", "CONFIG", "DATA")}

    def render(*sets: str) -> subprocess.CompletedProcess:
        args = [str(kube_binaries["helm"]), "template", "x", str(CHART), *sum((["--set", s] for s in sets), [])]
        return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)

    return render


def claim(i: int, namespace: str, name: str, operator_claim: str) -> str:
    entry = f"artifactClaims[{i}]"
    return f"{entry}.namespace={namespace},{entry}.claim={name},{entry}.operatorClaim={operator_claim}"


def test_same_named_claims_of_two_namespaces_mount_apart_from_their_operator_claims(helm_template):
    res = helm_template(claim(0, "team-a", "models", "team-a-models"), claim(1, "team-b", "models", "team-b-models"))
    assert res.returncode == 0, res.stderr
    deploy = next(d for d in yaml.safe_load_all(res.stdout) if d and d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounted = {mounts[name]["mountPath"]: (pvc["claimName"], pvc["readOnly"], mounts[name]["readOnly"])
               for name, pvc in claims.items()}
    assert mounted == {"/mnt/pvc/team-a/models": ("team-a-models", True, True),
                       "/mnt/pvc/team-b/models": ("team-b-models", True, True)}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["MEDDISTILL_PVC_ROOT"] == "/mnt/pvc"  # the root operator_dir resolves <namespace>/<claim> under


def test_the_old_claim_name_form_fails_naming_the_new_form(helm_template):
    res = helm_template("artifactClaims={models}")
    assert res.returncode != 0
    assert "artifactClaims[0]" in res.stderr and "{namespace: NAMESPACE, claim: models, operatorClaim: CLAIM}" in res.stderr


def test_an_entry_without_its_operator_claim_is_refused_by_the_schema(helm_template):
    res = helm_template("artifactClaims[0].namespace=team-a,artifactClaims[0].claim=models")
    assert res.returncode != 0 and "operatorClaim" in res.stderr, res.stderr
