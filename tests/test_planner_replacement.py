"""The pure planner while a served job's model is being replaced: the old model keeps answering during
the re-run; the app is updated in place (never deleted and re-created) only once the new model is
evaluated, has passed its gate and verifies."""

from __future__ import annotations

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
