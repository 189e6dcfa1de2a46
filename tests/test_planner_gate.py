"""The pure planner after evaluation: the evaluation gate and the served lineage decide whether the
quantized student is served (operator/serving_gate.py), with conditions, events and status.gate."""
from __future__ import annotations

from pathlib import Path

import yaml

from meddistill.gate import OVERRIDE_ANNOTATION
from meddistill.operator.planner import ArtifactRecord, Observed, Serve, ServingApp, StageRun, plan
from meddistill.operator.serving_gate import ServedLineage
from meddistill.spec.models import MedDistillJob, MedDistillJobStatus, ResultRow
from tests.test_gate_judge import DATASET, results_for
from tests.test_planner import NOW, STAGES

REPO = Path(__file__).resolve().parents[1]
CARD = "/a/quickstart/evaluate/README.md"
OPEN_QUESTIONS = "jsonl:@samples/general/general_medical_keywords.jsonl"  # the quickstart's second evaluation set
VERIFIED = ServedLineage(True, note="quantize and evaluate re-hashed (9 files)", model_card=CARD)


def gated_job(min_accuracy: float | None = None, annotations: dict | None = None, status: dict | None = None,
              gate_enabled: bool = True) -> MedDistillJob:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"].update(namespace="ns", generation=1, annotations=annotations or {})
    gate = {"enabled": gate_enabled}
    if min_accuracy is not None:
        gate["minAccuracy"] = [{"dataset": DATASET, "minAccuracy": min_accuracy}]
    doc["spec"]["serving"]["gate"] = gate
    if status is not None:
        doc["status"] = status
    return MedDistillJob.model_validate(doc)


def finished(lineage: ServedLineage | None = VERIFIED, serving: ServingApp | None = None) -> Observed:
    """Every stage done; evaluate's table: quantized 24/40 (0.60) on DATASET, better than base, and the
    quickstart's open questions (no accuracy: n = 0)."""
    table = results_for()
    table.rows += [ResultRow(model=m, dataset=OPEN_QUESTIONS, n=0) for m in ("base", "teacher", "student", "quantized")]
    results = table.model_dump(by_alias=True, exclude_none=True)
    runs = tuple(StageRun(stage=s, attempt=1, name=f"quickstart-{s}-a1", state="Succeeded", end_time="2026-01-01T11:59:00Z",
                          artifact=ArtifactRecord(uri=f"/a/quickstart/{s}", digest=f"{s}-digest",
                                                  results=results if s == "evaluate" else None))
                 for s in STAGES)
    return Observed(runs=runs, serving=serving, lineage=lineage)


def conditions(p) -> dict[str, dict]:
    return {c["type"]: c for c in p.status["conditions"]}


def test_a_failing_gate_ends_succeeded_not_serving_with_the_numbers():
    p = plan(gated_job(min_accuracy=0.75), finished(), NOW)
    assert not [c for c in p.create if isinstance(c, Serve)]
    assert p.status["phase"] == "Succeeded" and p.status["currentStage"] == ""
    gate = conditions(p)["EvaluationGate"]
    assert (gate["status"], gate["reason"]) == ("False", "Failed")
    assert f"{DATASET} accuracy 0.60 < 0.75" in gate["message"]
    assert p.status["gate"]["passed"] is False and p.status["gate"]["checks"][0]["value"] == 0.6
    warnings = [e for e in p.events if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["EvaluationGateFailed"] and "0.60 < 0.75" in warnings[0].message
    assert p.status["modelCard"] == CARD
    MedDistillJobStatus.model_validate(p.status)

    again = plan(gated_job(min_accuracy=0.75, status=p.status), finished(), NOW)  # level-triggered: no new event
    assert again.status == p.status and not [e for e in again.events if e.reason.startswith("EvaluationGate")]


def test_the_override_annotation_serves_it_and_status_records_who():
    first = plan(gated_job(min_accuracy=0.75), finished(), NOW)
    note = {OVERRIDE_ANNOTATION: "Dr Jane Roe: reviewed the 16 wrong answers"}
    p = plan(gated_job(min_accuracy=0.75, annotations=note, status=first.status), finished(), NOW)
    assert [c.model_uri for c in p.create if isinstance(c, Serve)] == ["/a/quickstart/quantize"]
    gate = conditions(p)["EvaluationGate"]
    assert (gate["status"], gate["reason"]) == ("True", "Overridden") and "0.60 < 0.75" in gate["message"]
    assert (p.status["gate"]["overriddenBy"], p.status["gate"]["overrideReason"]) == (
        "Dr Jane Roe", "reviewed the 16 wrong answers")
    assert p.status["gate"]["passed"] is False
    assert "EvaluationGateOverridden" in [e.reason for e in p.events]


def test_a_malformed_override_is_ignored_and_the_condition_says_so():
    p = plan(gated_job(min_accuracy=0.75, annotations={OVERRIDE_ANNOTATION: "Dr Jane Roe"}), finished(), NOW)
    assert p.status["phase"] == "Succeeded" and not p.create
    assert "is ignored" in conditions(p)["EvaluationGate"]["message"]


def test_a_passing_gate_serves():
    p = plan(gated_job(min_accuracy=0.55), finished(), NOW)
    assert [type(c).__name__ for c in p.create] == ["Serve"]
    assert p.status["phase"] == "Running" and p.status["currentStage"] == "serving"
    gate = conditions(p)["EvaluationGate"]
    assert (gate["status"], gate["reason"]) == ("True", "Passed") and "0.60 >= 0.55" in gate["message"]
    assert conditions(p)["LineageVerified"]["status"] == "True"


def test_the_gate_waits_for_evaluation():
    obs = finished()
    p = plan(gated_job(min_accuracy=0.55), Observed(runs=obs.runs[:2]), NOW)
    assert conditions(p)["EvaluationGate"]["status"] == "Unknown" and "gate" not in p.status


def test_a_changed_byte_in_the_served_weights_is_refused_naming_the_file():
    bad = ServedLineage(False, ("quantize/model.safetensors: sha256 1234, manifest records 5678",), model_card=CARD)
    p = plan(gated_job(gate_enabled=False), finished(lineage=bad), NOW)
    assert not p.create and p.status["phase"] == "Succeeded"
    lineage = conditions(p)["LineageVerified"]
    assert (lineage["status"], lineage["reason"]) == ("False", "Mismatch")
    assert "quantize/model.safetensors" in lineage["message"]
    assert [e.reason for e in p.events if e.type == "Warning"] == ["LineageMismatch"]
    assert "EvaluationGate" not in conditions(p)  # gate off: no gate condition


def test_a_served_app_whose_weights_stop_verifying_is_removed():
    app = ServingApp(name="quickstart", model_uri="/a/quickstart/quantize", ready=True)
    bad = ServedLineage(False, ("quantize/model.safetensors: sha256 1234, manifest records 5678",))
    p = plan(gated_job(gate_enabled=False), finished(lineage=bad, serving=app), NOW)
    assert [(d.kind, d.name) for d in p.delete] == [("serving", "quickstart")] and p.status["phase"] == "Succeeded"
    assert "withheld" in next(e.message for e in p.events if e.reason == "ServingRemoved")


def test_an_object_store_lineage_is_left_to_the_replica_and_serves():
    p = plan(gated_job(gate_enabled=False), finished(lineage=ServedLineage(None, note="replica re-hashes")), NOW)
    assert [type(c).__name__ for c in p.create] == ["Serve"]
    assert conditions(p)["LineageVerified"]["status"] == "Unknown"


def test_an_override_the_status_has_not_acted_on_is_not_an_echo_of_the_operators_write():
    from meddistill.operator.serving_gate import override_pending

    failed = {"gate": {"passed": False, "overriddenBy": "", "overrideReason": ""}}
    note = {OVERRIDE_ANNOTATION: "Dr Jane Roe: pilot"}
    assert override_pending(note, failed)
    assert not override_pending(note, {"gate": {"passed": False, "overriddenBy": "Dr Jane Roe", "overrideReason": "pilot"}})
    assert override_pending({}, {"gate": {"passed": False, "overriddenBy": "Dr Jane Roe", "overrideReason": "pilot"}})
    assert not override_pending(note, {"gate": {"passed": True}}) and not override_pending(note, {})
