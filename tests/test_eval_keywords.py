"""The shipped general-medicine keyword questions load as open questions and score with the real model."""
from meddistill.data import load_dataset
from meddistill.evaluation import evaluate
from meddistill.evaluation.open_metrics import keyword_groups, keyword_hit

REF = "jsonl:@samples/general/general_medical_keywords.jsonl"


def test_keyword_set_loads():
    ds = load_dataset(REF)
    assert len(ds.records) >= 20 and not ds.skipped
    assert len({r.id for r in ds.records}) == len(ds.records)
    for r in ds.records:
        assert r.question_type == "open" and r.answer and not r.is_scored_by_choice
        groups = keyword_groups(r.meta, r.id)
        assert groups and all(1 <= len(g) <= 6 for g in groups)
        # lenient enough that the reference answer itself hits, and the bare question does not give it away
        assert keyword_hit(r.answer, groups), r.id
        assert not keyword_hit(r.question, groups), r.id


def test_real_smollm2_answers_keyword_questions():
    from meddistill.modelsource import load_model

    model, tok = load_model("builtin:smollm2-135m-instruct")
    records = [r for r in load_dataset(REF).records
               if r.id in ("general-hypertension", "general-insulin", "general-asthma", "general-stroke")]
    result = evaluate(model, tok, records, batch_size=4, max_new_tokens=8, open_max_new_tokens=24,
                      latency_questions=0, progress=False)
    assert result.keyword_n == 4 and result.open_n == 4 and result.n_scored == 0
    for q, r in zip(result.questions, records):
        assert q.keyword_hit == keyword_hit(q.output, r.meta["keywords"]) and 0 < q.new_tokens <= 24
    # The untuned base model knows these (the issue measured 13/16 on such a set); a broken one would not.
    assert result.keyword_hits >= 3, [q.output for q in result.questions]
    assert result.repetitive_n == 0 and 0 < result.open_rouge_l < 1
