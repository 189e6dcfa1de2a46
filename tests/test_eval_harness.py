"""Evaluation harness: metrics helpers, a tiny random model for structure, the real SmolLM2 on PubMedQA."""
import json
import math
from pathlib import Path

import pytest

from meddistill.data import MedicalRecord, load_dataset
from meddistill.evaluation import EvalResult, evaluate, token_f1, wilson_interval, write_report


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and 0 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] > 0.65
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_token_f1():
    assert token_f1("Rest and fluids.", "rest and fluids") == 1.0
    assert token_f1("aspirin", "heparin") == 0.0
    assert 0 < token_f1("take aspirin daily", "aspirin") < 1


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template, saved as a local directory."""
    import torch
    import transformers

    from meddistill.modelsource import load_tokenizer

    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _mixed_records():
    pqa = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test", limit=3).records
    medqa = load_dataset("medqa:@samples/medqa/phrases_no_exclude_test.sample200.jsonl", limit=3).records
    open_ = [MedicalRecord("o1", "What are the symptoms of tetanus?", None, None, "Muscle stiffness.", "open", "t",
                           meta={"keywords": [["muscle", "stiff"]]})]
    return pqa + medqa + open_


def test_evaluate_structure_with_tiny_model(tiny_model_dir, tmp_path):
    from meddistill.modelsource import load_model

    model, tok = load_model(str(tiny_model_dir))
    records = _mixed_records()
    result = evaluate(model, tok, records, batch_size=3, max_new_tokens=4, open_max_new_tokens=6,
                      latency_questions=2, progress=False, model_name="tiny", dataset_name="mixed")
    assert result.n == 7 and result.n_scored == 6 and result.open_n == 1 and 0 <= result.open_f1 <= 1
    assert result.scoring == "generative" and result.acc_norm is None and 0 <= result.open_rouge_l <= 1
    assert [q.id for q in result.questions] == [r.id for r in records]  # input order, not length order
    assert set(result.by_type) == {"yes_no_maybe", "multiple_choice"}
    assert sum(g.n for g in result.by_type.values()) == result.n_scored
    assert result.correct == sum(q.correct for q in result.questions if q.correct is not None)
    assert result.unparsed == sum(q.predicted is None for q in result.questions if q.correct is not None)
    assert all(q.new_tokens <= 4 and q.prompt_tokens > 0 for q in result.questions if q.id != "o1")
    # the open question has its own budget (a random model never stops early: it uses all 6)
    assert result.questions[-1].new_tokens == 6 and result.open_max_new_tokens == 6
    assert result.keyword_n == 1 and result.keyword_hits == int(result.questions[-1].keyword_hit)
    assert all(0 <= q.repeated_4gram_share <= 1 and q.repetitive is not None for q in result.questions)
    assert result.repetitive_n == sum(q.repetitive for q in result.questions)
    # batch 1 over the first 2 prompts: decode time per token is below the whole question's time
    assert result.latency_questions == 2 and result.latency_b1_s > 0
    assert 0 < result.ms_per_token_b1 / 1000 < result.latency_b1_s
    assert result.ci_low <= result.accuracy <= result.ci_high
    assert result.latency_p50_s <= result.latency_p95_s and result.tokens_per_s > 0
    assert result.peak_rss_bytes > 0 and result.weight_bytes > 0 and result.peak_cuda_bytes is None
    data = json.loads(json.dumps(result.to_dict()))  # JSON-serializable
    assert EvalResult.from_dict(data) == result
    old = {k: v for k, v in data.items() if k not in ("scoring", "acc_norm", "truncated", "latency_b1_s",
                                                       "ms_per_token_b1", "open_rouge_l", "repetition_mean")}
    old["questions"] = [{k: v for k, v in q.items() if k not in ("rouge_l", "repetitive", "keyword_hit")}
                        for q in data["questions"]]
    assert EvalResult.from_dict(old).scoring == "generative"  # an eval.json from before these fields
    assert "questions" not in result.to_dict(include_questions=False)
    json_path, md_path = write_report(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["n"] == 7
    assert "| accuracy |" in md_path.read_text() and "yes_no_maybe" in md_path.read_text()


def test_cli_eval_and_data(tiny_model_dir, tmp_path, capsys):
    from meddistill.cli import main

    rc = main(["eval", "--model", str(tiny_model_dir), "--dataset",
               "medqa:@samples/medqa/phrases_no_exclude_test.sample200.jsonl", "--limit", "2",
               "--max-new-tokens", "3", "--batch-size", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0 and json.loads((tmp_path / "eval.json").read_text())["n_scored"] == 2
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", "--model", "builtin:nope", "--dataset", "medqa:@samples/medqa/"
                 "phrases_no_exclude_test.sample200.jsonl", "--limit", "1"]) == 1
    assert main(["data", "pubmedqa:@samples/pubmedqa/ori_pqal.json#test", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "records: 500" in out and "yes_no_maybe: 500" in out and '"question_type": "yes_no_maybe"' in out
    malformed = f"medqa:{Path(__file__).parent}/fixtures/data/medqa_malformed.jsonl"
    assert main(["data", malformed]) == 1
    assert main(["data", malformed, "--lenient", "--show", "0"]) == 0
    assert "skipped: 5" in capsys.readouterr().out


def test_real_smollm2_on_pubmedqa_test_questions():
    from meddistill.modelsource import load_model

    model, tok = load_model("builtin:smollm2-135m-instruct")
    test_split = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test").records
    # the 4 shortest abstracts of the official test split: real questions, affordable on 2 CPU cores
    records = sorted(test_split, key=lambda r: len(r.context) + len(r.question))[:4]
    result = evaluate(model, tok, records, batch_size=4, max_new_tokens=8, latency_questions=0, progress=False)
    assert result.n == result.n_scored == 4 and result.by_type["yes_no_maybe"].n == 4
    assert 0 <= result.correct <= 4 and result.accuracy == result.correct / 4
    assert result.ci_low <= result.accuracy <= result.ci_high
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(result.correct, 4))
    assert 0 <= result.unparsed_rate <= 1 and math.isclose(result.unparsed_rate, result.unparsed / 4)
    for q in result.questions:
        assert q.gold in ("yes", "no", "maybe") and q.output is not None and 0 < q.new_tokens <= 8
        assert q.predicted in ("yes", "no", "maybe") or q.reason  # unparsed always says why
    assert result.weight_bytes > 500e6  # 135M float32 parameters


def test_loglik_structure_with_tiny_model(tiny_model_dir):
    from meddistill.modelsource import load_model

    model, tok = load_model(str(tiny_model_dir))
    records = _mixed_records()
    result = evaluate(model, tok, records, scoring="loglik", batch_size=4, progress=False)
    assert result.scoring == "loglik" and result.n == result.n_scored == 6  # the open question is skipped
    assert [q.id for q in result.questions] == [r.id for r in records if r.is_scored_by_choice]
    for q, r in zip(result.questions, records):
        labels = sorted(r.options) if r.options else ["yes", "no", "maybe"]
        assert sorted(q.option_logprobs) == sorted(labels) and all(v < 0 for v in q.option_logprobs.values())
        assert q.predicted == max(labels, key=q.option_logprobs.get) and q.correct == (q.predicted == r.answer)
    assert result.accuracy == result.correct / 6 and result.unparsed == 0
    assert result.acc_norm == sum(q.correct_norm for q in result.questions) / 6
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(ValueError, match="scoring='nope'"):
        evaluate(model, tok, records, scoring="nope", progress=False)


def test_truncated_reasoning_counted_apart_from_other_unparsed():
    from meddistill.evaluation.harness import _group, _score

    record = MedicalRecord("m", "Which?", {"A": "x", "B": "y"}, None, "A", "multiple_choice", "t")
    outputs = [("Final answer: A", False), ("<think>A looks right, but B", False),  # cut off in its reasoning
               ("A looks right, but B", True),  # the template opened <think>; no </think> came
               ("I cannot tell.", False), ("<think>ok</think>\nFinal answer: B", False)]
    questions = [_score(record, text, 3, 0.1, prompt_tokens=5, keywords=None, prefilled_think=pre)
                 for text, pre in outputs]
    assert [q.reason == "truncated" for q in questions] == [False, True, True, False, False]
    group = _group(questions)
    assert (group.n, group.correct, group.unparsed, group.truncated) == (5, 1, 3, 2)


def test_cli_eval_limit_is_a_seeded_stratified_sample_and_both_scorings(tiny_model_dir, tmp_path, capsys):
    from meddistill.cli import main
    from meddistill.evaluation import sample_records

    ref = "pubmedqa:@samples/pubmedqa/ori_pqal.json#test"
    rc = main(["eval", "--model", str(tiny_model_dir), "--dataset", ref, "--limit", "3", "--seed", "5",
               "--scoring", "both", "--max-new-tokens", "2", "--latency-questions", "1", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    want = [r.id for r in sample_records(load_dataset(ref).records, 3, seed=5)]
    gen = json.loads((tmp_path / "eval.json").read_text())
    ll = json.loads((tmp_path / "loglik" / "eval.json").read_text())
    assert [q["id"] for q in gen["questions"]] == want == [q["id"] for q in ll["questions"]]
    assert gen["scoring"] == "generative" and gen["latency_b1_s"] > 0 and ll["scoring"] == "loglik"
    out = capsys.readouterr().out
    assert "[generative] accuracy" in out and "[loglik] acc" in out and "ms/token" in out
    assert "acc_norm" in (tmp_path / "loglik" / "eval.md").read_text()
    assert "batch 1, first 1 questions" in (tmp_path / "eval.md").read_text()
