"""The evaluation gate's verdict (meddistill/gate.py) on results tables built by the real
results_table from synthetic answers: each check's number against its threshold, in words, and
the override annotation (valid, malformed, on a passing gate)."""
from __future__ import annotations

import pytest

from meddistill.gate import OVERRIDE_ANNOTATION, judge, parse_override
from meddistill.jobs.results_table import build_results
from meddistill.spec.models import Evaluation, EvaluationGate
from tests.test_eval_table import BASE, DATASET, MB, QUANTIZED, STUDENT, TEACHER, answers, fake_eval

EVALUATION = Evaluation(datasets=[DATASET])


def results_for(quantized: str = QUANTIZED, base: str = BASE):
    """base 14/40, teacher 28/40, student 30/40; quantized by default the student minus 6 (24/40)."""
    evals = {kind: [fake_eval(answers(pattern), dtype="x", weights=100 * MB, peak=MB, b1_s=0.1, ms_token=1.0)]
             for kind, pattern in (("base", base), ("teacher", TEACHER), ("student", STUDENT), ("quantized", quantized))}
    return build_results(evals, {DATASET: []})


def gate(**kw) -> EvaluationGate:
    return EvaluationGate.model_validate({"enabled": True, **kw})


def test_every_check_passes_with_its_number_in_words():
    results = results_for()
    verdict = judge(gate(minAccuracy=[{"dataset": DATASET, "minAccuracy": 0.5}], minRetentionPct=50),
                    results, EVALUATION)
    assert verdict.status.passed and verdict.serve
    by_name = {c.name: c for c in verdict.status.checks}
    assert list(by_name) == ["minAccuracy", "minRetentionPct", "notWorseThanBase"]
    assert by_name["minAccuracy"].value == pytest.approx(0.6) and "accuracy 0.60 >= 0.50" in by_name["minAccuracy"].message
    assert by_name["minRetentionPct"].value == results.retention_ci_low
    assert f"lower bound {results.retention_ci_low:.1f}% >= 50.0%" in by_name["minRetentionPct"].message
    # quantized 24/40 vs base 14/40 on the same questions: better, so not worse
    assert "+25.0 points vs base" in by_name["notWorseThanBase"].message
    assert verdict.condition()[:2] == ("True", "Passed")


def test_a_floor_above_the_accuracy_fails_stating_both_numbers():
    verdict = judge(gate(minAccuracy=[{"dataset": DATASET, "minAccuracy": 0.61}], notWorseThanBase=False),
                    results_for(), EVALUATION)
    assert not verdict.status.passed and not verdict.serve
    [check] = verdict.failed_checks
    assert (check.value, check.threshold) == (pytest.approx(0.6), 0.61)
    status, reason, message = verdict.condition()
    assert (status, reason) == ("False", "Failed")
    assert f"{DATASET} accuracy 0.60 < 0.61" in message and OVERRIDE_ANNOTATION in message


def test_retention_reads_the_lower_bound_not_the_point_estimate():
    results = results_for()  # retention 80%, its lower bound well below
    verdict = judge(gate(minRetentionPct=results.retention_ci_low + 1, notWorseThanBase=False), results, EVALUATION)
    assert results.accuracy_retention_pct > results.retention_ci_low + 1  # the point alone would pass
    assert not verdict.status.passed and "<" in verdict.failed_checks[0].message


def test_significantly_worse_than_base_fails_with_the_mcnemar_p():
    # base gets 14 right; this quantized model gets none of them (and nothing else): 14 discordant, all lost
    verdict = judge(gate(), results_for(quantized="0" * 40), EVALUATION)
    [check] = verdict.failed_checks
    assert check.name == "notWorseThanBase" and check.value < 0.05 and check.threshold == 0.05
    assert "-35.0 points vs base" in check.message and "significantly worse than base" in check.message


def test_a_missing_number_fails_rather_than_passes():
    verdict = judge(gate(minAccuracy=[{"dataset": DATASET, "minAccuracy": 0.1}], minRetentionPct=10), None, EVALUATION)
    assert not verdict.status.passed and len(verdict.failed_checks) == 3
    assert all("not measured" in c.message and c.value is None for c in verdict.failed_checks)


def test_loglik_scoring_reads_the_labelled_loglik_rows():
    results = results_for()
    loglik = results.model_copy(deep=True)
    for row in loglik.rows:
        row.dataset, row.scoring = f"{DATASET} [loglik]", "loglik"
    verdict = judge(gate(scoring="loglik", minAccuracy=[{"dataset": DATASET, "minAccuracy": 0.5}], notWorseThanBase=False),
                    loglik, EVALUATION)
    assert verdict.status.passed and "(loglik, n=40" in verdict.status.checks[0].message
    assert not judge(gate(scoring="loglik", minAccuracy=[{"dataset": DATASET, "minAccuracy": 0.5}], notWorseThanBase=False),
                     results, EVALUATION).status.passed  # generative rows do not count for a loglik gate


def test_override_serves_a_failing_gate_and_records_who_and_why():
    annotations = {OVERRIDE_ANNOTATION: "Dr Jane Roe: reviewed all 16 wrong answers, acceptable for the pilot"}
    verdict = judge(gate(minAccuracy=[{"dataset": DATASET, "minAccuracy": 0.9}]), results_for(), EVALUATION, annotations)
    assert not verdict.status.passed and verdict.serve
    assert verdict.status.overridden_by == "Dr Jane Roe"
    assert verdict.status.override_reason == "reviewed all 16 wrong answers, acceptable for the pilot"
    status, reason, message = verdict.condition()
    assert (status, reason) == ("True", "Overridden") and "overridden by Dr Jane Roe" in message and "0.60 < 0.90" in message


def test_override_on_a_passing_gate_is_not_recorded():
    verdict = judge(gate(), results_for(), EVALUATION, {OVERRIDE_ANNOTATION: "Dr Jane Roe: just in case"})
    assert verdict.status.passed and verdict.status.overridden_by == ""


@pytest.mark.parametrize("value", ["Dr Jane Roe", ": no name", "Dr Jane Roe:   ", ""])
def test_a_malformed_override_is_ignored_and_says_how_to_write_it(value):
    verdict = judge(gate(minAccuracy=[{"dataset": DATASET, "minAccuracy": 0.9}]), results_for(), EVALUATION,
                    {OVERRIDE_ANNOTATION: value})
    assert not verdict.serve and verdict.status.overridden_by == ""
    assert "is ignored" in verdict.override_problem and '"NAME: REASON"' in verdict.override_problem
    assert verdict.override_problem in verdict.condition()[2]


def test_parse_override_keeps_colons_in_the_reason():
    assert parse_override({OVERRIDE_ANNOTATION: " Dr Roe : see ticket MED-12: approved "}) == (
        "Dr Roe", "see ticket MED-12: approved", "")
    assert parse_override({"other": "x"}) == ("", "", "")


def test_an_open_questions_only_dataset_has_nothing_to_compare_with_base():
    results = results_for()
    for row in results.rows:
        row.n = 0  # what the evaluate stage writes for a dataset of open questions
    [check] = judge(gate(), results, EVALUATION).status.checks
    assert check.passed and "open questions only" in check.message
