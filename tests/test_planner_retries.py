"""The pure planner's honest failures: retries back off, a raised backoffLimit resumes a Failed job,
a local artifacts.uri the backend's pods cannot share is refused before anything starts, and no job
name the spec accepts gives a child name KubeRay refuses."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meddistill.operator.planner import Observed, StartStage, plan, run_name
from meddistill.operator.retries import RETRY_MAX_SECONDS, retry_delay_seconds
from meddistill.spec.models import BACKOFF_LIMIT_MAX, KUBERAY_NAME_MAX, NAME_MAX, STAGES, MedDistillJob, stage_run_suffix
from tests.test_planner import NOW, advance, make_job, run


def at(seconds: float):
    return NOW + timedelta(seconds=seconds)


def failed(stage: str, attempt: int, end: float | None) -> object:
    return run(stage, attempt, "Failed", reason="AppFailed", message="exit code 1",
               end_time="" if end is None else at(end).strftime("%Y-%m-%dT%H:%M:%SZ"))


def test_delay_doubles_per_attempt_up_to_ten_minutes():
    assert [retry_delay_seconds(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert retry_delay_seconds(7) == retry_delay_seconds(BACKOFF_LIMIT_MAX) == RETRY_MAX_SECONDS == 600


def test_retry_waits_out_the_backoff_from_the_failure_time():
    job, _ = advance(make_job(runPolicy={"backoffLimit": 3}), Observed())
    a1 = failed("teacher", 1, end=0)
    job, p = advance(job, Observed(runs=(a1,)), now=at(4))
    assert p.create == [] and p.requeue_after == pytest.approx(6)
    st = p.status["stages"][0]
    assert st["state"] == "Pending" and "exit code 1" in st["message"] and "starts at 2026-01-01T12:00:10Z" in st["message"]
    assert [e.reason for e in p.events] == ["StageBackoff"] and p.status["phase"] == "Running"
    job, p = advance(job, Observed(runs=(a1,)), now=at(7))
    assert p.create == [] and p.events == []  # announced once, not on every resync
    job, p = advance(job, Observed(runs=(a1,)), now=at(10))
    assert p.create == [StartStage("teacher", 2, "quickstart-teacher-a2")] and p.requeue_after is None

    a2 = failed("teacher", 2, end=30)  # the second failure waits twice as long
    job, p = advance(job, Observed(runs=(a1, a2)), now=at(49))
    assert p.create == [] and p.requeue_after == pytest.approx(1)
    _, p = advance(job, Observed(runs=(a1, a2)), now=at(50))
    assert p.create == [StartStage("teacher", 3, "quickstart-teacher-a3")]


def test_a_failure_without_end_time_waits_from_when_it_was_first_seen():
    job, _ = advance(make_job(), Observed())
    a1 = failed("teacher", 1, end=None)
    job, p = advance(job, Observed(runs=(a1,)), now=at(100))
    assert p.create == [] and p.status["stages"][0]["endTime"] == "2026-01-01T12:01:40Z"
    job, p = advance(job, Observed(runs=(a1,)), now=at(105))
    assert p.create == []
    _, p = advance(job, Observed(runs=(a1,)), now=at(110))
    assert p.create == [StartStage("teacher", 2, "quickstart-teacher-a2")]


def test_a_failed_child_deleted_during_its_backoff_is_not_started_again():
    job, _ = advance(make_job(), Observed())
    job, p = advance(job, Observed(runs=(failed("teacher", 1, end=0),)), now=at(1))
    assert p.status["stages"][0]["lastFailure"] == "quickstart-teacher-a1 failed: AppFailed: exit code 1"
    job, p = advance(job, Observed(), now=at(2))  # ttlSecondsAfterFinished 0: the RayJob is gone
    assert p.create == [] and p.status["stages"][0]["state"] == "Pending"
    # Why it failed comes from status.stages[].lastFailure, not from parsing its message: the retry says it.
    st = job.status.stages[0]
    job = job.model_copy(update={"status": job.status.model_copy(update={"stages": [
        st.model_copy(update={"message": "anything a person or an older operator wrote"})]})})
    _, p = advance(job, Observed(), now=at(11))
    retrying = [e.message for e in p.events if e.reason == "StageRetrying"]
    assert retrying and retrying[0].startswith("quickstart-teacher-a1 failed: AppFailed: exit code 1; starting attempt 2")
    _, p = advance(job, Observed(), now=at(11))
    assert p.create == [StartStage("teacher", 2, "quickstart-teacher-a2")]


@pytest.mark.parametrize("child_kept", [True, False], ids=["child-kept", "child-ttl-deleted"])
def test_raising_backoff_limit_resumes_a_failed_job(child_kept):
    job, _ = advance(make_job(runPolicy={"backoffLimit": 0}), Observed())
    a1 = failed("teacher", 1, end=0)
    job, p = advance(job, Observed(runs=(a1,)), now=at(1))
    assert p.status["phase"] == "Failed"
    observed = Observed(runs=(a1,) if child_kept else ())
    _, p = advance(job, observed, now=at(60))
    assert p.create == [] and p.status["phase"] == "Failed"  # the same limit: still terminal

    raised = job.model_copy(update={"spec": job.spec.model_copy(update={
        "run_policy": job.spec.run_policy.model_copy(update={"backoff_limit": 1})})})
    _, p = advance(raised, observed, now=at(60))
    assert p.create == [StartStage("teacher", 2, "quickstart-teacher-a2")]
    assert p.status["phase"] == "Running" and p.status["stages"][0]["attempt"] == 2
    assert next(c for c in p.status["conditions"] if c["type"] == "Failed")["status"] == "False"
    assert "JobResumed" in [e.reason for e in p.events]


@pytest.mark.parametrize("uri,local_paths,why", [
    ("/data/runs", "per-pod", "each KubeRay pod has a filesystem of its own"),
    ("./runs", "per-pod", "relative path"),
    ("./runs", "shared", "relative path"),
])
def test_a_local_store_the_pods_cannot_share_is_refused_before_any_stage(uri, local_paths, why):
    job = make_job(artifacts={"uri": uri})
    job, p = advance(job, Observed(local_paths=local_paths))
    assert p.create == [] and p.status["phase"] == "Failed"
    cond = next(c for c in p.status["conditions"] if c["type"] == "Failed")
    assert cond["status"] == "True" and cond["reason"] == "ArtifactStoreNotShared"
    assert why in cond["message"] and "s3://BUCKET/PREFIX or pvc://CLAIM/PATH" in cond["message"]
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "ArtifactStoreNotShared")]
    job, p = advance(job, Observed(local_paths=local_paths))
    assert p.events == []  # once, not on every resync
    fixed = job.model_copy(update={"spec": job.spec.model_copy(update={
        "artifacts": job.spec.artifacts.model_copy(update={"uri": "s3://bucket/runs"})})})
    _, p = advance(fixed, Observed(local_paths=local_paths))
    assert p.create == [StartStage("teacher", 1, "quickstart-teacher-a1")] and p.status["phase"] == "Running"


@pytest.mark.parametrize("uri,local_paths", [
    ("/shared/runs", "shared"),  # an existing Ray cluster whose nodes mount one path (tests/test_e2e_ray.py)
    ("pvc://models/runs", "per-pod"),
    ("./runs", ""),  # the backend did not say: nothing is checked
])
def test_a_store_the_pods_can_reach_is_accepted(uri, local_paths):
    p = plan(make_job(artifacts={"uri": uri}), Observed(local_paths=local_paths), NOW)
    assert p.create == [StartStage("teacher", 1, "quickstart-teacher-a1")]


def test_no_job_name_the_spec_accepts_overflows_kuberays_name_limit():
    last_attempt = BACKOFF_LIMIT_MAX + 1
    longest = max(STAGES, key=len)
    assert len(run_name("a" * NAME_MAX, longest, last_attempt)) == KUBERAY_NAME_MAX
    assert all(run_name("j", s, 7) == "j" + stage_run_suffix(s, 7) for s in STAGES)
    doc = make_job().model_dump(by_alias=True, mode="json")
    doc["metadata"]["name"] = "a" * (NAME_MAX + 1)
    with pytest.raises(ValueError, match=f"at most {NAME_MAX} characters"):
        MedDistillJob.model_validate(doc)


def test_a_run_kuberay_refused_as_invalid_fails_the_job_once_and_an_edit_retries_it():
    job, _ = advance(make_job(runPolicy={"backoffLimit": 3}), Observed())
    refused = run("teacher", 1, "Failed", reason="InvalidRun",
                  message="KubeRay refused the RayJob: The RayJob spec is invalid: authOptions.mode is 'token' but ...")
    job, p = advance(job, Observed(runs=(refused,)), now=at(1))
    st = p.status["stages"][0]
    assert p.create == [] and p.status["phase"] == "Failed" and st["state"] == "Failed"
    assert "authOptions.mode is 'token'" in st["message"] and st["attempt"] == 1  # no retry used up
    assert [e.reason for e in p.events if e.type == "Warning"] == ["StageFailed", "JobFailed"]
    assert "not retried" in next(e.message for e in p.events if e.reason == "StageFailed")
    job, p = advance(job, Observed(runs=(refused,)), now=at(700))  # no backoff ever ends it
    assert p.create == [] and p.status["phase"] == "Failed" and not [e for e in p.events if e.type == "Warning"]
    edited = job.model_copy(update={"metadata": job.metadata.model_copy(update={"generation": 2})})
    _, p = advance(edited, Observed(runs=(refused,)), now=at(701))
    assert p.create == [StartStage("teacher", 2, "quickstart-teacher-a2")]
