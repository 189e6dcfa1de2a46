"""Evaluation-gated, lineage-checked serving: the operator as a real process against a real
kube-apiserver, with the chart's RBAC.

The test plays KubeRay, as tests/test_operator_kube.py does, and writes each stage's artifact the
way the stages do: files, then a manifest recording the sha256 of every file and the digest of
each upstream manifest. The evaluate table comes from the real results_table over synthetic
answers (quantized 24/40 = 0.60 on PubMedQA, better than base). The store is pvc://, whose claim the
chart mounts into the operator per namespace (here: pvc_store() under MEDDISTILL_PVC_ROOT, a temp dir).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from meddistill import artifacts
from meddistill.gate import OVERRIDE_ANNOTATION
from meddistill.spec.models import MedDistillJobStatus, ResultRow
from tests.test_gate_judge import DATASET, results_for
from tests.test_operator_kube import (
    STAGES, Kube, OperatorProcess, install_operator_prereqs, now_rfc3339, pvc_root, pvc_store, quickstart, wait_for,
)

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube

OPEN_QUESTIONS = "jsonl:@samples/general/general_medical_keywords.jsonl"  # the quickstart's second evaluation set
WEIGHTS = "model.safetensors"
RESYNC_S = 20.0


@pytest.fixture(scope="module")
def operator(kube_cluster, pvc_root, tmp_path_factory):
    install_operator_prereqs(kube_cluster)
    # A slow resync: the override must take effect through its own event, not the periodic re-plan.
    op = OperatorProcess(kube_cluster, tmp_path_factory.mktemp("operator") / "operator.log", resync=RESYNC_S).start()
    yield op
    op.stop()


@pytest.fixture
def kube(kube_cluster, operator):
    ns = f"gate-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", ns)
    yield Kube(kube_cluster, ns)
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def store(kube: Kube) -> str:
    return pvc_store(kube.ns)


def gated(name: str, kube: Kube, min_accuracy: float | None) -> dict:
    gate = {"enabled": min_accuracy is not None}
    if min_accuracy is not None:
        gate["minAccuracy"] = [{"dataset": DATASET, "minAccuracy": min_accuracy}]
    doc = quickstart(name, store(kube))
    doc["spec"]["serving"]["gate"] = gate
    return doc


def evaluate_table() -> dict:
    table = results_for()
    table.rows += [ResultRow(model=m, dataset=OPEN_QUESTIONS, n=0) for m in ("base", "teacher", "student", "quantized")]
    return table.model_dump(by_alias=True)


def write_stage(uri: str, job: str, stage: str, digests: dict[str, str]) -> str:
    """A stage's files, then its manifest with the upstream digests (as jobs/stage.py writes them)."""
    d = artifacts.local_path(artifacts.stage_uri(uri, job, stage), namespace=job.partition("/")[0])  # operator's mount
    d.mkdir(parents=True, exist_ok=True)
    if stage == "quantize":
        (d / WEIGHTS).write_bytes(os.urandom(64 * 1024))
    elif stage == "evaluate":
        (d / "results.json").write_text(json.dumps(evaluate_table()))
        (d / "README.md").write_text(f"# {job}: model card\n")
    else:
        (d / "output.txt").write_text(f"{stage} output\n")
    inputs = {s: digests[s] for s in STAGES[:STAGES.index(stage)] if s in digests}
    return artifacts.write_manifest(d, stage=stage, config={}, inputs=inputs).digest


def run_pipeline(kube: Kube, job: str, before_evaluate=None) -> None:
    digests: dict[str, str] = {}
    for stage in STAGES:
        name = f"{job}-{stage}-a1"
        kube.wait_rayjob(name)
        kube.kuberay_runs(name)
        if stage == "evaluate" and before_evaluate:
            before_evaluate()
        digests[stage] = write_stage(store(kube), kube.job_dir(job), stage, digests)
        kube.kuberay_succeeds(name)


def status(kube: Kube, job: str) -> dict:
    return kube.job(job).get("status", {})


def condition(st: dict, ctype: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == ctype), {})


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_failing_gate_ends_not_serving_then_an_override_serves_it(kube, operator):
    kube.apply(gated("failing", kube, min_accuracy=0.75))
    run_pipeline(kube, "failing")
    st = wait_for(lambda: (s := status(kube, "failing")).get("phase") == "Succeeded" and s, 30, "phase Succeeded")
    gate = condition(st, "EvaluationGate")
    assert (gate["status"], gate["reason"]) == ("False", "Failed")
    assert f"{DATASET} accuracy 0.60 < 0.75" in gate["message"], gate["message"]
    assert st["gate"]["passed"] is False and st["gate"]["checks"][0]["threshold"] == 0.75
    assert st["modelCard"].endswith(f"/{kube.job_dir('failing')}/evaluate/README.md")
    assert MedDistillJobStatus.model_validate(st)
    # Events are posted after the status write.
    wait_for(lambda: "EvaluationGateFailed" in kube.events("failing"), 10, "a EvaluationGateFailed event")
    assert not kube.rayservices("failing")

    kube.cluster.kubectl("annotate", "mdj", "failing", "-n", kube.ns,
                         f"{OVERRIDE_ANNOTATION}=Dr Jane Roe: reviewed the 16 wrong answers; pilot only")
    service = wait_for(lambda: kube.rayservices("failing"), RESYNC_S / 2, "the RayService after the override")[0]
    assert artifacts.stage_uri(store(kube), kube.job_dir("failing"), "quantize") in service["spec"]["serveConfigV2"]
    st = wait_for(lambda: (s := status(kube, "failing")).get("gate", {}).get("overriddenBy") and s, 30, "overriddenBy")
    assert (st["gate"]["overriddenBy"], st["gate"]["overrideReason"]) == ("Dr Jane Roe", "reviewed the 16 wrong answers; pilot only")
    gate = condition(st, "EvaluationGate")
    assert (gate["status"], gate["reason"]) == ("True", "Overridden") and "0.60 < 0.75" in gate["message"]
    wait_for(lambda: "EvaluationGateOverridden" in kube.events("failing"), 10, "a EvaluationGateOverridden event")
    # The operator watches every namespace; other tests' namespaces may log their own (intended) 403s.
    assert not [line for line in operator.log().splitlines() if "Forbidden" in line and f"{kube.ns}/" in line]


def test_passing_gate_serves(kube):
    kube.apply(gated("passing", kube, min_accuracy=0.55))
    run_pipeline(kube, "passing")
    wait_for(lambda: kube.rayservices("passing"), 30, "the RayService")
    kube.custom.patch_namespaced_custom_object_status("ray.io", "v1", kube.ns, "rayservices", "passing", {"status": {
        "serviceStatus": "Running",
        "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "ready",
                        "lastTransitionTime": now_rfc3339()}]}})
    st = wait_for(lambda: (s := status(kube, "passing")).get("phase") == "Serving" and s, 30, "phase Serving")
    gate = condition(st, "EvaluationGate")
    assert (gate["status"], gate["reason"]) == ("True", "Passed") and "accuracy 0.60 >= 0.55" in gate["message"]
    assert st["gate"] == {**st["gate"], "passed": True, "overriddenBy": ""}
    assert condition(st, "LineageVerified")["status"] == "True"


def test_one_changed_byte_of_the_quantized_weights_is_refused_naming_the_file(kube, pvc_root):
    kube.apply(gated("tampered", kube, min_accuracy=None))  # no gate: only the lineage stands in the way
    job_dir = kube.job_dir("tampered")
    weights = artifacts.local_path(artifacts.stage_uri(store(kube), job_dir, "quantize"), namespace=kube.ns) / WEIGHTS
    run_pipeline(kube, "tampered", before_evaluate=lambda: flip_byte(weights))  # after its manifest was written
    st = wait_for(lambda: (s := status(kube, "tampered")).get("phase") == "Succeeded" and s, 30, "phase Succeeded")
    lineage = condition(st, "LineageVerified")
    assert (lineage["status"], lineage["reason"]) == ("False", "Mismatch")
    assert f"quantize/{WEIGHTS}: sha256" in lineage["message"], lineage["message"]
    wait_for(lambda: "LineageMismatch" in kube.events("tampered"), 10, "a LineageMismatch event")
    assert not kube.rayservices("tampered")

    flip_byte(weights)  # restored: the same bytes the manifest records, so it verifies and serves
    wait_for(lambda: kube.rayservices("tampered"), 3 * RESYNC_S, "the RayService once the weights verify (next resync)")
    # The RayService is created before the status that reports the verified lineage is written.
    wait_for(lambda: condition(status(kube, "tampered"), "LineageVerified").get("status") == "True", 10, "LineageVerified")
