"""The pure planner: the whole MedDistillJob lifecycle without an API server."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from meddistill.operator.backends.kuberay_objects import serving_target
from meddistill.operator.planner import (
    ArtifactRecord,
    DeleteChild,
    Observed,
    Serve,
    ServingApp,
    StageRun,
    StartStage,
    plan,
)
from meddistill.spec.models import MedDistillJob, MedDistillJobStatus

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
STAGES = ["teacher", "distill-data", "distill", "quantize", "evaluate"]
RESULTS = {"rows": [{"model": "teacher", "accuracy": 0.6}, {"model": "quantized", "accuracy": 0.55, "n": 40}],
           "memoryReductionPct": -70.0}


def make_job(status: dict | None = None, **spec_changes) -> MedDistillJob:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"].update(namespace="ns", generation=3)
    for dotted, value in spec_changes.items():
        node = doc["spec"]
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if status is not None:
        doc["status"] = status
    return MedDistillJob.model_validate(doc)


def advance(job: MedDistillJob, observed: Observed, now=NOW) -> tuple[MedDistillJob, object]:
    """Plan (the KubeRay backend naming the serving app), then 'write' the status back as the handlers do."""
    p = plan(job, replace(observed, target=serving_target(job)), now)
    MedDistillJobStatus.model_validate(p.status)  # the status is always valid as written
    doc = job.model_dump(by_alias=True, mode="json")
    doc["metadata"] = {**doc["metadata"], **(job.metadata.model_extra or {})}
    doc["status"] = p.status
    return MedDistillJob.model_validate(doc), p


def run(stage, attempt, state, **kw) -> StageRun:
    return StageRun(stage=stage, attempt=attempt, name=f"quickstart-{stage}-a{attempt}", state=state, **kw)


def done(stage, attempt=1) -> StageRun:
    results = RESULTS if stage == "evaluate" else None
    return run(stage, attempt, "Succeeded", end_time="2026-01-01T11:59:00Z",
               artifact=ArtifactRecord(uri=f"/a/quickstart/{stage}", digest=f"{stage}-digest", results=results))


def test_new_job_starts_first_stage_only():
    job, p = advance(make_job(), Observed())
    assert p.create == [StartStage("teacher", 1, "quickstart-teacher-a1")]
    assert p.delete == []
    assert p.status["phase"] == "Running" and p.status["currentStage"] == "teacher"
    assert [s["name"] for s in p.status["stages"]] == STAGES
    assert [s["state"] for s in p.status["stages"]] == ["Running"] + ["Pending"] * 4
    assert p.status["observedGeneration"] == 3
    conds = {c["type"]: c for c in p.status["conditions"]}
    assert conds["Progressing"]["status"] == "True" and conds["Ready"]["status"] == "False"
    assert any(e.reason == "StageStarted" for e in p.events)


def test_same_input_same_plan_and_no_duplicate_children():
    job, _ = advance(make_job(), Observed())
    observed = Observed(runs=(run("teacher", 1, "Running"),))
    p1, p2 = plan(job, observed, NOW), plan(job, observed, NOW + timedelta(minutes=5))
    assert p1.create == p2.create == [] and p1.delete == []
    assert p1.status == p2.status  # timestamps do not move without a transition
    assert p1.events == []


def test_whole_pipeline_to_serving():
    job, observed = make_job(), []
    for i, stage in enumerate(STAGES):
        job, p = advance(job, Observed(runs=tuple(observed)))
        assert p.create == [StartStage(stage, 1, f"quickstart-{stage}-a1")], (stage, p.create)
        assert p.status["currentStage"] == stage
        observed.append(done(stage))
    job, p = advance(job, Observed(runs=tuple(observed)))
    assert p.create == [Serve("quickstart", "/a/quickstart/quantize")]
    assert p.status["phase"] == "Running" and p.status["currentStage"] == "serving"
    assert all(s["state"] == "Succeeded" for s in p.status["stages"])
    assert p.status["stages"][0]["artifactDigest"] == "teacher-digest"
    assert p.status["accuracy"] == "55.0%"
    assert p.status["results"]["memoryReductionPct"] == -70.0
    assert p.status["serving"]["endpoint"] == "http://quickstart-serve-svc.ns.svc:8000/v1"

    app = ServingApp("quickstart", "/a/quickstart/quantize", ready=False)
    job, p = advance(job, Observed(runs=tuple(observed), serving=app))
    assert p.create == [] and p.status["phase"] == "Running"
    job, p = advance(job, Observed(runs=tuple(observed), serving=ServingApp("quickstart", "/a/quickstart/quantize", ready=True)))
    assert p.status["phase"] == "Serving" and p.status["serving"]["ready"] is True
    conds = {c["type"]: c for c in p.status["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "Serving"
    assert [e.reason for e in p.events] == ["ServingReady"]


def test_recorded_stages_survive_children_being_deleted():
    job, observed = make_job(), []
    for stage in STAGES[:3]:
        job, _ = advance(job, Observed(runs=tuple(observed)))
        observed.append(done(stage))
    job, p = advance(job, Observed(runs=tuple(observed)))
    # The TTL removed the finished RayJobs: nothing is started again, quantize keeps running.
    job, p = advance(job, Observed(runs=(run("quantize", 1, "Running"),)))
    assert p.create == [] and [s["state"] for s in p.status["stages"]][:3] == ["Succeeded"] * 3


def test_succeeded_run_waits_for_its_manifest_then_counts_as_failed():
    job, _ = advance(make_job(), Observed())
    no_manifest = run("teacher", 1, "Succeeded", end_time="2026-01-01T11:59:00Z")
    job, p = advance(job, Observed(runs=(no_manifest,)))
    assert p.create == [] and p.status["stages"][0]["state"] == "Running"
    assert "manifest" in p.status["stages"][0]["message"]
    _, p = advance(job, Observed(runs=(no_manifest,)), now=NOW + timedelta(minutes=10))
    assert p.create == [StartStage("teacher", 2, "quickstart-teacher-a2")]
    assert "ArtifactMissing" in p.status["stages"][0]["message"]


def test_failures_retry_up_to_backoff_limit_then_fail():
    job, _ = advance(make_job(runPolicy={"backoffLimit": 1}), Observed())
    # Failed a minute ago: attempt 1's 10 s backoff is over (tests/test_planner_retries.py waits it out).
    failed1 = run("teacher", 1, "Failed", reason="DeadlineExceeded", message="took too long", end_time="2026-01-01T11:59:00Z")
    job, p = advance(job, Observed(runs=(failed1,)))
    assert p.create == [StartStage("teacher", 2, "quickstart-teacher-a2")]
    assert p.status["phase"] == "Running" and p.status["stages"][0]["attempt"] == 2
    failed2 = run("teacher", 2, "Failed", reason="AppFailed", message="CUDA OOM")
    job, p = advance(job, Observed(runs=(failed1, failed2)))
    assert p.create == []
    assert p.status["phase"] == "Failed" and p.status["stages"][0]["state"] == "Failed"
    failed_cond = next(c for c in p.status["conditions"] if c["type"] == "Failed")
    assert failed_cond["status"] == "True" and "AppFailed" in failed_cond["message"] and "CUDA OOM" in failed_cond["message"]
    assert any(e.type == "Warning" and e.reason == "JobFailed" for e in p.events)
    # Terminal: even with every child gone, nothing starts again.
    _, p = advance(job, Observed())
    assert p.create == [] and p.status["phase"] == "Failed"


def test_suspend_removes_running_child_and_resume_recreates_same_attempt():
    job, _ = advance(make_job(), Observed(runs=(done("teacher"),)))
    job, p = advance(job, Observed(runs=(done("teacher"),)))
    assert p.create == [StartStage("distill-data", 1, "quickstart-distill-data-a1")]
    running = run("distill-data", 1, "Running")
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"suspend": True})})
    job, p = advance(job, Observed(runs=(done("teacher"), running)))
    assert p.delete == [DeleteChild("stage", "quickstart-distill-data-a1")] and p.create == []
    assert p.status["phase"] == "Suspended"
    assert next(c for c in p.status["conditions"] if c["type"] == "Suspended")["status"] == "True"
    # Still suspended, child gone: nothing happens.
    job, p = advance(job, Observed(runs=(done("teacher"),)))
    assert p.create == [] and p.delete == [] and p.status["phase"] == "Suspended"
    # Resume while the old child is still being deleted: wait; then re-create the same attempt.
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"suspend": False})})
    _, p = advance(job, Observed(runs=(done("teacher"), run("distill-data", 1, "Deleting"))))
    assert p.create == []
    job, p = advance(job, Observed(runs=(done("teacher"),)))
    assert p.create == [StartStage("distill-data", 1, "quickstart-distill-data-a1")]
    assert p.status["phase"] == "Running" and any(e.reason == "JobResumed" for e in p.events)


def test_online_teacher_skips_distill_data_stage_and_serving_disabled_succeeds():
    job = make_job(distillation__teacherCache="online", serving__enabled=False)
    observed = []
    for stage in ["teacher", "distill", "quantize", "evaluate"]:
        job, p = advance(job, Observed(runs=tuple(observed)))
        assert [c.stage for c in p.create] == [stage]
        observed.append(done(stage))
    job, p = advance(job, Observed(runs=tuple(observed)))
    assert p.create == [] and p.status["phase"] == "Succeeded" and "serving" not in p.status
    assert next(c for c in p.status["conditions"] if c["type"] == "Ready")["status"] == "True"


def test_model_change_updates_serving_in_place():
    job, observed = make_job(), tuple(done(s) for s in STAGES)
    job, _ = advance(job, Observed(runs=observed))
    stale = ServingApp("quickstart", "/a/old/quantize", ready=True)
    _, p = advance(job, Observed(runs=observed, serving=stale))
    assert p.update == [Serve("quickstart", "/a/quickstart/quantize")]
    assert p.create == [] and p.delete == []
    assert p.status["phase"] == "Running"


def test_status_shows_excluded_record_ids_capped_and_hashed_never_verbatim():
    """Eval record ids can be patient identifiers; status is readable by whoever may `get` the job."""
    ids = [f"MRN-00{n:05d}" for n in range(30)]
    results = {**RESULTS, "excluded": [{"dataset": "jsonl:/data/ward.jsonl", "count": 30, "ids": ids}]}
    observed = Observed(runs=tuple(
        run(s, 1, "Succeeded", end_time="2026-01-01T11:59:00Z", artifact=ArtifactRecord(
            uri=f"/a/quickstart/{s}", digest=f"{s}-digest", results=results if s == "evaluate" else None))
        for s in STAGES))
    job, p = advance(make_job(), observed)
    shown = p.status["results"]["excluded"][0]
    assert shown["count"] == 30 and len(shown["ids"]) == 20
    assert all(i.startswith("sha256:") and len(i) == len("sha256:") + 12 for i in shown["ids"])
    assert not [i for i in shown["ids"] if "MRN" in i]
    import hashlib
    assert shown["ids"][0] == "sha256:" + hashlib.sha256(ids[0].encode()).hexdigest()[:12]  # the same id, the same hash
    # Planned again from the written status (the stage children gone): carried over, not hashed twice.
    _, again = advance(job, Observed())
    assert again.status["results"]["excluded"][0]["ids"] == shown["ids"]
