"""The results table from synthetic evaluation results (no model): rows, paired comparisons,
the paper's comparison, exclusions, markdown and the `meddistill run` summary."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from meddistill.evaluation import EvalResult
from meddistill.spec.models import Results
from meddistill.jobs.results_table import build_results, markdown_table, paired_answers

MB = 2**20
DATASET = "pubmedqa:@samples/pubmedqa/ori_pqal.json#test"


def fake_eval(correct_by_id: dict[str, bool], *, dtype: str, weights: int, peak: int, b1_s: float, ms_token: float,
              dataset: str = DATASET, excluded: int = 0) -> dict:
    """What evaluate_model returns for one dataset: only EvalResult's fields plus the three it adds."""
    n, correct = len(correct_by_id), sum(correct_by_id.values())
    r = {f.name: None for f in dataclasses.fields(EvalResult) if f.name != "questions"}
    r |= {"model": "", "dataset": dataset, "n": n, "n_scored": n, "correct": correct, "accuracy": correct / n,
          "ci_low": 0.8 * correct / n, "ci_high": min(1.0, 1.2 * correct / n), "unparsed": 0, "unparsed_rate": 0.0,
          "by_type": {}, "open_n": 0, "seconds_per_question": b1_s / 4, "tokens_per_s": 40.0, "peak_rss_bytes": peak,
          "weight_bytes": weights, "latency_b1_s": b1_s, "ms_per_token_b1": ms_token, "scoring": "generative"}
    return r | {"correct_by_id": correct_by_id, "dtype": dtype, "excluded": excluded}


def answers(pattern: str) -> dict[str, bool]:
    return {f"q{i:02d}": ch == "1" for i, ch in enumerate(pattern)}


# 40 questions. student: 30 right; quantized: the same minus 6 of them (6 discordant, all lost).
STUDENT = "1" * 30 + "0" * 10
QUANTIZED = "0" * 6 + "1" * 24 + "0" * 10
TEACHER = "1" * 28 + "0" * 12
BASE = "1" * 14 + "0" * 26


@pytest.fixture
def evals() -> dict[str, list[dict]]:
    return {
        "base": [fake_eval(answers(BASE), dtype="float32", weights=400 * MB, peak=900 * MB, b1_s=0.50, ms_token=40.0)],
        "teacher": [fake_eval(answers(TEACHER), dtype="float32", weights=400 * MB, peak=900 * MB, b1_s=0.50, ms_token=40.0)],
        "student": [fake_eval(answers(STUDENT), dtype="bfloat16", weights=200 * MB, peak=500 * MB, b1_s=0.40, ms_token=32.0)],
        "quantized": [fake_eval(answers(QUANTIZED), dtype="nf4", weights=50 * MB, peak=250 * MB, b1_s=0.30, ms_token=30.0)],
    }


def test_comparisons_pair_answers_by_question_id_not_position():
    a = answers("1100110011")
    shuffled = list(a.items())
    random.Random(3).shuffle(shuffled)
    b = dict(shuffled) | {"extra": True}  # a question a never answered is left out of the pair
    a_ok, b_ok = paired_answers({"correct_by_id": a}, {"correct_by_id": b})
    assert a_ok == b_ok and len(a_ok) == 10


def test_quantized_that_lost_6_of_40_gets_the_exact_p_and_a_verdict(evals):
    results = build_results(evals, {DATASET: []})
    pairs = {(c.a, c.b): c for c in results.comparisons}
    assert list(pairs) == [("base", "teacher"), ("teacher", "student"), ("student", "quantized"), ("base", "quantized")]
    q = pairs[("student", "quantized")]
    assert (q.n, q.only_a_correct, q.only_b_correct) == (40, 6, 0)
    assert q.p_value == pytest.approx(0.03125)
    assert q.delta_pct_points == pytest.approx(-15.0) and q.ci_low < -15.0 < q.ci_high < 0
    assert q.verdict == "quantized worse than student by -15.0 points at n = 40 (p = 0.031)"
    t = pairs[("teacher", "student")]  # 2 discordant, both to the student: not significant
    assert (t.only_a_correct, t.only_b_correct, t.p_value) == (0, 2, 0.5)
    assert t.verdict == "no significant difference at n = 40 (p = 0.50)"
    assert pairs[("base", "teacher")].verdict.startswith("teacher better than base by +35.0 points")


def test_the_papers_comparison_is_quantized_vs_the_16bit_student(evals):
    results = build_results(evals, {DATASET: []})
    assert results.memory_reduction_pct == pytest.approx(75.0)  # 50 MB vs 200 MB
    assert results.peak_memory_reduction_pct == pytest.approx(50.0)
    assert results.latency_reduction_pct == pytest.approx(25.0)  # b1: 0.30 s vs 0.40 s
    assert results.per_token_latency_reduction_pct == pytest.approx(100 * (1 - 30 / 32))
    assert results.accuracy_retention_pct == pytest.approx(80.0)  # 24 / 30
    assert results.retention_ci_low < 80.0 < results.retention_ci_high
    second = results.teacher_vs_quantized
    assert second.baseline == "teacher (float32)" and second.memory_reduction_pct == pytest.approx(87.5)
    assert [r.model for r in results.rows] == ["base", "teacher", "student", "quantized"]
    assert results.rows[1].latency_b1_ms == pytest.approx(500.0) and results.rows[2].dtype == "bfloat16"


def test_markdown_has_the_papers_line_and_no_retention_without_its_interval(evals):
    md = markdown_table(build_results(evals, {DATASET: []}))
    assert "Paper's comparison (quantized vs 16-bit student, bfloat16): weight memory -75.0 %, peak -50.0 %, latency -25.0 % (b1)" in md
    assert "Teacher vs quantized student (second line" in md and "weight memory -87.5 %" in md
    assert "| quantized - student |" in md and "quantized worse than student by -15.0 points" in md
    retention_lines = [line for line in md.splitlines() if "retention" in line]
    assert retention_lines and all("CI" in line for line in retention_lines)


def test_a_student_with_no_correct_answer_prints_no_retention_number(evals):
    evals["student"][0] = fake_eval(answers("0" * 40), dtype="bfloat16", weights=200 * MB, peak=500 * MB, b1_s=0.4, ms_token=32.0)
    results = build_results(evals, {DATASET: []})
    assert results.accuracy_retention_pct is None
    assert "accuracy retention n/a" in markdown_table(results)


def test_exclusions_are_listed_with_the_row_count(evals):
    for kind in evals:
        evals[kind][0]["excluded"] = 2
    results = build_results(evals, {DATASET: ["q98", "q99"]})
    assert results.excluded[0].model_dump() == {"dataset": DATASET, "count": 2, "ids": ["q98", "q99"]}
    md = markdown_table(results)
    assert "| 40 (2 excluded: seen in training) |" in md and "q98, q99" in md


def test_without_a_student_row_there_is_no_papers_figure(evals):
    del evals["student"]
    results = build_results(evals, {DATASET: []})
    assert results.memory_reduction_pct is None and results.accuracy_retention_pct is None
    assert [(c.a, c.b) for c in results.comparisons] == [("base", "teacher"), ("base", "quantized")]
    assert "not available" in markdown_table(results)


def test_results_survive_the_status_round_trip_and_old_status_still_validates(evals):
    results = build_results(evals, {DATASET: ["q99"]})
    assert Results.model_validate(json.loads(json.dumps(results.model_dump(by_alias=True)))) == results
    old = {"rows": [{"model": "quantized", "dataset": "d", "accuracy": 0.5, "n": 40, "weightBytes": 1, "latencyMs": 2.0,
                     "tokensPerSecond": 3.0}], "memoryReductionPct": 70.0, "accuracyRetentionPct": 90.0}
    assert Results.model_validate(old).rows[0].latency_b1_ms is None


def test_run_summary_prints_the_table_comparisons_and_papers_line(evals, tiny_job, capsys, monkeypatch):
    from meddistill.cli.run_cmd import print_summary
    from meddistill.jobs.stage import StageContext

    monkeypatch.setenv("COLUMNS", "400")  # rich wraps at the terminal width; keep each line whole
    ctx = StageContext(tiny_job())
    out = Path(ctx.uri("evaluate"))
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(build_results(evals, {DATASET: []}).model_dump(by_alias=True)))
    print_summary(ctx, [], 1.0)
    text = capsys.readouterr().out
    assert "b1 latency ms/q" in text and "quantized worse than student by -15.0 points" in text
    assert "Paper's comparison (quantized vs 16-bit student, bfloat16): weight memory -75.0 %" in text
    assert "accuracy retention 80.0 % (95% CI" in text and "Teacher vs quantized student (second line" in text


def test_evaluation_excludes_questions_the_training_data_holds(tiny_job, tmp_path):
    from meddistill.jobs.evaluate import evaluation_records
    from meddistill.jobs.stage import StageContext

    long_q = ("In adults with newly diagnosed essential hypertension and no diabetes, does a thiazide diuretic as "
              "first-line therapy reduce stroke incidence compared with a beta blocker over five years?")
    train = [{"id": "t-exact", "question": "Do statins lower low-density lipoprotein cholesterol?", "answer": "yes"},
             {"id": "t-ngram", "question": long_q, "answer": "yes"},
             {"id": "t-other", "question": "Is penicillin effective against viral infections?", "answer": "no"}]
    evals = [{"id": "e-exact", "question": "Do statins lower low-density lipoprotein CHOLESTEROL ?", "answer": "yes"},
             {"id": "e-ngram", "question": "Asked again: " + long_q.replace("five years", "ten years"), "answer": "no"},
             *({"id": f"e-{i}", "question": f"Does intervention {i} change outcome {i} in cohort {i}?", "answer": "maybe"}
               for i in range(5))]
    for name, rows in (("train", train), ("eval", evals)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r | {"question_type": "yes_no_maybe"}) + "\n" for r in rows))
    job = tiny_job(teacher={"datasets": [f"jsonl:{tmp_path / 'train.jsonl'}"]},
                   evaluation={"datasets": [f"jsonl:{tmp_path / 'eval.jsonl'}"], "limit": 0})
    datasets, excluded = evaluation_records(StageContext(job))
    ref = job.spec.evaluation.datasets[0]
    assert sorted(excluded[ref]) == ["e-exact", "e-ngram"]
    assert [r.id for r in datasets[ref]] == [f"e-{i}" for i in range(5)]


def test_evaluation_sample_is_seeded(tiny_job, tiny_data_refs):
    from meddistill.jobs.evaluate import evaluation_records
    from meddistill.jobs.stage import StageContext

    def ids(seed):
        job = tiny_job(evaluation={"limit": 4, "seed": seed})
        return [r.id for r in evaluation_records(StageContext(job))[0][tiny_data_refs["eval"]]]

    assert ids(0) == ids(0) and len(ids(0)) == 4
    assert any(ids(0) != ids(s) for s in range(1, 6))


def test_open_question_datasets_get_their_own_table_and_no_accuracy(evals):
    medquad = "jsonl:@samples/medquad/heldout.jsonl"
    for kind, f1 in (("base", 0.31), ("quantized", 0.22)):
        r = fake_eval({"x": True}, dtype="float32", weights=MB, peak=MB, b1_s=1.0, ms_token=20.0, dataset=medquad)
        evals[kind].append(r | {"n_scored": 0, "correct": 0, "accuracy": None, "ci_low": None, "ci_high": None,
                                "correct_by_id": {}, "open_n": 20, "open_f1": f1, "open_rouge_l": f1 - 0.05,
                                "repetition_mean": 0.04, "repetitive_n": 1, "keyword_hits": 13, "keyword_n": 16})
    results = build_results(evals, {DATASET: [], medquad: []})
    md = markdown_table(results)
    assert f"| quantized | float32 | {medquad} | n/a (open questions) |" in md
    assert f"| base | {medquad} | 0.310 | 0.260 | 4.0% | 1 | 13/16 |" in md
    assert all(c.dataset == DATASET for c in results.comparisons)  # nothing to pair on open questions
    assert results.accuracy_retention_pct == pytest.approx(80.0)  # closed questions only


def test_loglik_rows_are_compared_apart_and_never_pooled_into_the_papers_figures(evals):
    """Each model also has a loglik row (labelled dataset, no batch-1 latency): the paper's latency
    and retention still come from the generative rows alone, and comparisons pair like with like."""
    loglik = f"{DATASET} [loglik]"
    for kind, pattern in (("base", BASE), ("teacher", TEACHER), ("student", "1" * 40), ("quantized", "0" * 40)):
        row = fake_eval(answers(pattern), dtype="x", weights=evals[kind][0]["weight_bytes"], peak=1, b1_s=0.0,
                        ms_token=0.0, dataset=loglik)
        evals[kind].append(row | {"scoring": "loglik", "latency_b1_s": None, "ms_per_token_b1": None})
    results = build_results(evals, {DATASET: []})
    generative_only = build_results({k: v[:1] for k, v in evals.items()}, {DATASET: []})
    assert results.latency_reduction_pct == generative_only.latency_reduction_pct is not None
    assert results.accuracy_retention_pct == generative_only.accuracy_retention_pct == 80.0  # 24 of 30
    loglik_cmp = [c for c in results.comparisons if c.dataset == loglik]
    assert [(c.a, c.b) for c in loglik_cmp] == [("base", "teacher"), ("teacher", "student"), ("student", "quantized"),
                                                ("base", "quantized")]
    assert loglik_cmp[2].only_a_correct == 40 and loglik_cmp[2].p_value < 1e-6
    assert {r.scoring for r in results.rows if r.dataset == loglik} == {"loglik"}
