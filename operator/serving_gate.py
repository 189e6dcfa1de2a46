"""May this job's quantized student be served? The planner's question after evaluation, answered
purely from the spec, the results table, the annotations and the observed lineage check.

Two things must hold (each an extra condition in status):
  EvaluationGate   serving.gate's verdict (meddistill/gate.py), or a named person's override
  LineageVerified  the served artifact's chain re-hashed by the handlers (served_lineage.py): the
                   quantize files against their manifest, and the evaluate stage's recorded digest of
                   that manifest (so the model served is the model evaluated)
A job that fails either ends Succeeded, not Serving: its stages did succeed, the model is withheld.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from meddistill.gate import CONDITION as GATE_CONDITION
from meddistill.gate import judge, parse_override
from meddistill.spec.models import GateStatus, MedDistillJob, MedDistillJobStatus, Results

LINEAGE_CONDITION = "LineageVerified"


@dataclass(frozen=True)
class ServedLineage:
    """What the handlers found re-hashing the served chain (observed, like a child's state)."""

    verified: bool | None  # None: not re-hashed by the operator (object store; see note)
    problems: tuple[str, ...] = ()  # each names the file or link that does not match
    note: str = ""
    model_card: str = ""  # the card's location when the evaluate artifact holds one


@dataclass
class ServingDecision:
    allowed: bool = True
    gate: GateStatus | None = None
    conditions: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # type -> (status, reason, message)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    model_card: str = ""


def decide(job: MedDistillJob, prev: MedDistillJobStatus, evaluated: bool, results: Results | None,
           lineage: ServedLineage | None) -> ServingDecision:
    """evaluated: every stage succeeded (the results table is final)."""
    gate_spec = job.spec.serving.gate
    out = ServingDecision(model_card=lineage.model_card if lineage else "")
    if gate_spec.enabled and not evaluated:
        out.conditions[GATE_CONDITION] = ("Unknown", "AwaitingEvaluation", "the gate is judged once evaluation succeeds")
    elif gate_spec.enabled:
        annotations = (job.metadata.model_extra or {}).get("annotations") or {}
        verdict = judge(gate_spec, results, job.spec.evaluation, annotations)
        out.gate, out.allowed = verdict.status, verdict.serve
        out.conditions[GATE_CONDITION] = verdict.condition()
        if prev.gate != verdict.status:  # once per verdict, not on every resync
            status, reason, message = verdict.condition()
            event = {"Passed": ("Normal", "EvaluationGatePassed"), "Overridden": ("Warning", "EvaluationGateOverridden"),
                     "Failed": ("Warning", "EvaluationGateFailed")}[reason]
            out.events.append((*event, f"evaluation gate {message}"))
    if evaluated and lineage is not None:
        if lineage.verified is False:
            out.allowed = False
            message = "the served artifact does not verify, not serving it: " + "; ".join(lineage.problems)
            out.conditions[LINEAGE_CONDITION] = ("False", "Mismatch", message)
            old = next((c for c in prev.conditions if c.type == LINEAGE_CONDITION), None)
            if old is None or old.message != message:
                out.events.append(("Warning", "LineageMismatch", message))
        elif lineage.verified:
            out.conditions[LINEAGE_CONDITION] = ("True", "Verified", lineage.note)
        else:
            out.conditions[LINEAGE_CONDITION] = ("Unknown", "CheckedAtLoad", lineage.note)
    return out


def override_pending(annotations: dict | None, status: dict | None) -> bool:
    """An override annotation added, changed or removed since the last verdict was written.

    Annotations do not bump the generation, so the handlers would take the event for an echo of
    their own status write and leave the override to the next resync."""
    gate = (status or {}).get("gate")
    if not gate or gate.get("passed"):
        return False
    name, reason, _ = parse_override(annotations)
    return (name, reason) != (gate.get("overriddenBy", ""), gate.get("overrideReason", ""))
