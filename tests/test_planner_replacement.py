"""The pure planner while a served job's model is being replaced: the old model keeps answering during
the re-run; the app is updated in place (never deleted and re-created) only once the new model is
evaluated, has passed its gate and verifies."""

from __future__ import annotations

from dataclasses import replace

from meddistill.operator.planner import Observed, Serve, ServingApp
from meddistill.spec.models import MedDistillJobStatus
from tests.test_planner import STAGES, advance, done, make_job, run
from tests.test_planner_gate import finished, gated_job

OLD = ServingApp("quickstart", "/a/old/quantize", ready=True)


def serving_job(**spec_changes):
    """A job that served OLD, now re-running from quantize (its status keeps the stages before)."""
    job, _ = advance(make_job(**spec_changes), Observed(runs=tuple(done(s) for s in STAGES), serving=OLD))
    status = MedDistillJobStatus.model_validate(job.status.model_dump(by_alias=True))
    status.stages = [s for s in status.stages if s.name not in ("quantize", "evaluate")]
    return job.model_copy(update={"status": status})


def rerun_observed(*stages_done: str, **kw) -> Observed:
    done_runs = [done(s) for s in STAGES[:3] + list(stages_done)]
    return Observed(runs=(*done_runs, run(STAGES[3 + len(stages_done)], 2, "Running")), **kw)


def test_the_old_model_keeps_serving_while_the_stages_re_run():
    job = serving_job()
    job, p = advance(job, rerun_observed(serving=OLD))
    assert p.delete == [] and p.update == [] and p.create == []
    assert p.status["phase"] == "Running" and p.status["currentStage"] == "quantize"
    assert p.status["serving"]["ready"] is True and p.status["serving"]["child"] == "quickstart"
    _, p = advance(job, rerun_observed("quantize", serving=OLD))  # evaluating the new model: still the old one
    assert p.delete == [] and p.update == [] and p.status["serving"]["ready"] is True


def test_the_new_model_replaces_the_old_in_place_once_evaluated():
    job = serving_job()
    job, p = advance(job, Observed(runs=tuple(done(s) for s in STAGES), serving=OLD))
    assert p.update == [Serve("quickstart", "/a/quickstart/quantize")] and p.delete == [] and p.create == []
    assert p.status["phase"] == "Running"  # Serving once the new model reports ready
    new = ServingApp("quickstart", "/a/quickstart/quantize", ready=True)
    _, p = advance(job, Observed(runs=tuple(done(s) for s in STAGES), serving=new))
    assert p.status["phase"] == "Serving" and p.update == []


def test_a_new_model_that_fails_its_gate_is_never_swapped_in():
    # The failing verdict withholds the new model: no update to it (the app is removed, as for any
    # withheld model: its artifact path now holds the unverified weights a restarted replica would load).
    job = gated_job(min_accuracy=0.99)
    _, p = advance(job, finished(serving=OLD))
    assert p.update == [] and p.create == []
    assert [d.kind for d in p.delete] == ["serving"]


def test_suspending_a_re_run_still_removes_the_app():
    job = serving_job(suspend=True)
    _, p = advance(job, rerun_observed(serving=OLD))
    assert [d.kind for d in p.delete] == ["serving", "stage"] or [d.kind for d in p.delete] == ["stage", "serving"]


# ---- serving.replaces ---------------------------------------------------------------------------

A_APP = ServingApp("mdj_ns_old-job", "/a/old-job/quantize", ready=True, owner="ns/old-job")


def replacing(app: ServingApp | None, moves: bool = True, **spec):
    """The quickstart job, every stage done, replacing `old-job`; its backend observes old-job's app."""
    job = make_job(serving__replaces="old-job", **spec)
    return advance(job, Observed(runs=tuple(done(s) for s in STAGES), serving=app, moves_serving=moves))


def conditions(p) -> dict[str, dict]:
    return {c["type"]: c for c in p.status["conditions"]}


def test_replaces_takes_the_other_jobs_app_over_in_place_once_its_model_is_ready():
    job, p = replacing(A_APP)
    assert p.update == [Serve("mdj_ns_old-job", "/a/quickstart/quantize")] and not p.create and not p.delete
    assert conditions(p)["Replaces"]["reason"] == "AwaitingModel"
    taken = replace(A_APP, model_uri="/a/quickstart/quantize", owner="ns/quickstart")
    _, p = advance(job, Observed(runs=tuple(done(s) for s in STAGES), serving=taken, moves_serving=True))
    assert p.status["phase"] == "Serving" and not p.update
    assert conditions(p)["Replaces"]["status"] == "True" and "in place of ns/old-job" in conditions(p)["Replaces"]["message"]


def test_replaces_leaves_the_old_app_alone_while_its_own_stages_run():
    job = make_job(serving__replaces="old-job")
    _, p = advance(job, Observed(runs=(run("teacher", 1, "Running"),), serving=A_APP, moves_serving=True))
    assert not p.update and not p.delete and "serving" not in p.status
    assert conditions(p)["Replaces"]["status"] == "Unknown"


def test_the_replaced_job_stops_reconciling_its_app_and_says_by_whom():
    job = make_job()  # the old job: its app now records the new job as owner
    taken = ServingApp("quickstart", "/a/new/quantize", ready=True, owner="ns/new-job")
    _, p = advance(job, Observed(runs=tuple(done(s) for s in STAGES), serving=taken, moves_serving=True))
    assert not p.update and not p.delete and not p.create  # no fight over the model, never deleted
    assert p.status["phase"] == "Succeeded"
    replaced = conditions(p)["Replaced"]
    assert replaced["status"] == "True" and "ns/new-job" in replaced["message"]
    assert [e.reason for e in p.events if e.reason == "ReplacedBy"] == ["ReplacedBy"]


def test_replaces_refuses_a_missing_job_itself_a_third_owner_and_kuberay():
    cases = [
        (dict(app=None), "no serving app of MedDistillJob ns/old-job"),
        (dict(app=replace(A_APP, owner="ns/third")), "taken over by ns/third"),
        (dict(app=A_APP, moves=False), "KubeRay"),
    ]
    for kw, says in cases:
        _, p = replacing(kw["app"], kw.get("moves", True))
        cond = conditions(p)["Replaces"]
        assert (cond["status"], cond["reason"]) == ("False", "Refused") and says in cond["message"], cond
        assert not p.create and not p.update and not p.delete and p.status["phase"] == "Succeeded"
        assert "remove spec.serving.replaces" in cond["message"]
        assert any(e.type == "Warning" and e.reason == "ReplacesRefused" for e in p.events)
    _, p = advance(make_job(serving__replaces="quickstart"), Observed(runs=tuple(done(s) for s in STAGES), moves_serving=True))
    assert "names this job itself" in conditions(p)["Replaces"]["message"] and not p.create
