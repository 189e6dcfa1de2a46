"""CLI/CRD parity: every spec in tests/invalid_specs/ is refused by `meddistill validate` *and* by a
real API server running the CRD freshly generated from the typed models (`meddistill crd`), so a
job the CLI refuses never gets as far as the operator."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from meddistill.spec.models import NAME_MAX
from tests.support.kube_cluster import REPO_ROOT

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube

INVALID = sorted((REPO_ROOT / "tests" / "invalid_specs").glob("*.yaml"))
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def generated_crd_namespace(kube_cluster):
    crd = subprocess.run([sys.executable, "-m", "meddistill.cli", "crd"], capture_output=True, text=True, check=True).stdout
    kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=meddistill-tests", "-f", "-", input=crd)
    deadline = time.monotonic() + 30
    while True:  # the new schema is served once the CRD is Established again
        conds = json.loads(kube_cluster.kubectl("get", "crd", "meddistilljobs.meddistill.io", "-o", "json").stdout)["status"]
        if any(c["type"] == "Established" and c["status"] == "True" for c in conds.get("conditions") or []):
            break
        assert time.monotonic() < deadline, "the generated CRD never became Established"
        time.sleep(0.2)
    ns = f"parity-{uuid.uuid4().hex[:8]}"
    kube_cluster.kubectl("create", "namespace", ns)
    yield ns
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def test_the_issue_12_specs_are_in_the_collection():
    names = {p.name for p in INVALID}
    assert {"dataset-no-format.yaml", "dataset-empty-split.yaml", "name-with-dot.yaml",
            "name-overflows-child-names.yaml", "ray-client-address.yaml"} <= names


def test_cli_and_api_server_refuse_every_invalid_spec(kube_cluster, generated_crd_namespace):
    cli = subprocess.run([sys.executable, "-m", "meddistill.cli", "validate", *map(str, INVALID)],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert cli.returncode == 1 and f"0 valid, {len(INVALID)} invalid" in cli.stderr, cli.stderr
    accepted = []
    for path in INVALID:
        res = kube_cluster.kubectl("create", "--dry-run=server", "-n", generated_crd_namespace, "-f", str(path), check=False)
        if res.returncode == 0:
            accepted.append(path.name)
        else:
            assert res.stderr.strip(), path.name  # refused with a message, not silently
    assert accepted == [], f"the API server accepts what `meddistill validate` refuses: {accepted}"


@pytest.mark.parametrize("name,message", [
    ("dataset-no-format.yaml", "spec.teacher.datasets[1]: Invalid value"),
    ("dataset-empty-split.yaml", "spec.evaluation.datasets[0]: Invalid value"),
    ("name-with-dot.yaml", "metadata.name must be lowercase letters, digits and '-'"),
    ("name-overflows-child-names.yaml", f"metadata.name must be at most {NAME_MAX} characters"),
    ("ray-client-address.yaml", "spec.ray.address: Invalid value"),
    # `..` climbs out of the claim or folder a reference names (another tenant's, on a shared cluster).
    ("parent-segment-model.yaml", "spec.teacher.model: Invalid value: \"pvc://models/../../other-namespace/models/llama\": a '..' path segment is refused"),
    ("parent-segment-dataset.yaml", "spec.teacher.datasets[1]: Invalid value: \"jsonl:pvc://data/../../../etc/records.jsonl\": a '..' path segment is refused"),
    ("parent-segment-eval-dataset.yaml", "spec.evaluation.datasets[1]: Invalid value: \"medqa:../secret/test.jsonl#test\": a '..' path segment"),
    ("parent-segment-artifacts.yaml", "spec.artifacts.uri: Invalid value: \"pvc://artifacts/..\": a '..' path segment is refused"),
    ("parent-segment-student-model.yaml", "spec.student.model: Invalid value: \"/models/../root/x\": a '..' path segment"),
])
def test_api_server_names_the_field_of_the_new_rules(kube_cluster, generated_crd_namespace, name, message):
    res = kube_cluster.kubectl("create", "--dry-run=server", "-n", generated_crd_namespace,
                               "-f", str(REPO_ROOT / "tests" / "invalid_specs" / name), check=False)
    assert res.returncode != 0 and message in res.stderr, res.stderr


def test_api_server_accepts_every_valid_example(kube_cluster, generated_crd_namespace, tmp_path):
    """The other half of parity: the new patterns and CEL do not refuse what `validate` accepts."""
    edge = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    edge["metadata"]["name"] = "edge-0"
    edge["spec"]["evaluation"]["datasets"] = ["PubMedQA : @samples/pubmedqa/ori_pqal.json # test ", "jsonl:a#b.jsonl#dev",
                                              "pubmedqa: pvc://data.ward-3/pq#al.json#train", "hf:pvc://d/saved",
                                              "jsonl:pvc://data/runs..old/.../x..jsonl"]  # dots, never a ".." segment
    edge["spec"]["teacher"]["model"] = " pvc://hospital-models/smollm2 "  # inputs on claims
    edge["spec"]["scheduling"] = {"nodeSelector": {"pool": "cpu"}, "stages": {"teacher": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(edge))
    valid = [*EXAMPLES, tmp_path / "edge.yaml"]
    accepted_by_cli = subprocess.run([sys.executable, "-m", "meddistill.cli", "validate", *map(str, valid)],
                                     capture_output=True, text=True, cwd=REPO_ROOT)
    assert accepted_by_cli.returncode == 0, accepted_by_cli.stderr
    for path in valid:
        doc = yaml.safe_load(path.read_text())
        doc["metadata"].pop("namespace", None)  # into the test's namespace
        res = kube_cluster.kubectl("create", "--dry-run=server", "-n", generated_crd_namespace, "-f", "-",
                                   input=yaml.safe_dump(doc), check=False)
        assert res.returncode == 0, f"{path.name}: {res.stderr}"
