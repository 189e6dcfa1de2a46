"""Every loader on real in-repo samples and on malformed input (strict raises file:line, lenient reports)."""
import json
import shutil
from pathlib import Path

import pytest

from meddistill.data import QUESTION_TYPES, DataFormatError, MedicalRecord, load_dataset

FIX = Path(__file__).parent / "fixtures" / "data"


def test_pubmedqa_sample_splits():
    all_ = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json")
    test = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test")
    train = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#train")
    assert (len(all_), len(test), len(train)) == (1000, 500, 500)
    assert not {r.id for r in test} & {r.id for r in train}
    r = test.records[0]
    assert r.question_type == "yes_no_maybe" and r.answer in ("yes", "no", "maybe") and r.source == "pubmedqa"
    assert r.context and r.options is None and r.reasoning
    from meddistill.data.refs import SAMPLES_DIR

    gold = json.loads((SAMPLES_DIR / "pubmedqa/test_ground_truth.json").read_text())
    assert {x.id: x.answer for x in test} == gold


def test_pubmedqa_limit_and_base_dir():
    from meddistill.data.refs import SAMPLES_DIR

    ds = load_dataset("pubmedqa:ori_pqal.json#test", base_dir=SAMPLES_DIR / "pubmedqa", limit=7)
    assert len(ds) == 7 and ds.skipped == []


def test_medqa_sample():
    ds = load_dataset("medqa:@samples/medqa/phrases_no_exclude_test.sample200.jsonl")
    assert len(ds) == 200 and ds.question_type_counts() == {"multiple_choice": 200}
    r = ds.records[0]
    assert set(r.options) == {"A", "B", "C", "D"} and r.answer in r.options
    assert r.meta["meta_info"] in ("step1", "step2&3")


def test_medquad_sample_dir_and_file():
    ds = load_dataset("medquad:@samples/medquad")
    assert len(ds) > 20 and not ds.skipped
    assert all(r.answer and r.options is None and r.source == "medquad" for r in ds)
    assert any(r.meta.get("qtype") == "information" for r in ds)
    # the <doc>/<qaPairs>/<pair> schema variant found upstream
    ninds = load_dataset("medquad:@samples/medquad/6_NINDS_QA/0000007.xml")
    assert len(ninds) == 4 and ninds.records[0].question.lower().startswith("what is holmes-adie")
    # an empty <QAPairs/> document is no records, not an error
    assert len(load_dataset("medquad:@samples/medquad/5_NIDDK_QA/0000056.xml")) == 0


def test_instruction_sample_chatdoctor():
    ds = load_dataset("instruction:@samples/chatdoctor/chatdoctor5k.sample300.json")
    assert len(ds) == 300
    r = ds.records[0]
    assert r.question_type in ("open", "medication", "case_diagnosis")
    assert r.meta["instruction"].startswith("If you are a doctor") and r.answer


def test_medmcqa_and_mmlu_handmade():
    mc = load_dataset(f"medmcqa:{FIX}/medmcqa_dev.sample.json")
    assert [r.answer for r in mc] == ["C", "B", "D", "A", "A", None]  # cop is 1-based; -1 = unlabelled
    assert mc.records[0].reasoning.startswith("The lateral rectus") and mc.records[0].id == "hm-medmcqa-0001"
    mm = load_dataset(f"mmlu:{FIX}/mmlu/anatomy_test.csv")
    assert [r.answer for r in mm] == ["B", "C", "A", "D", "B"]
    assert "chorda tympani" in mm.records[2].question and mm.records[4].meta["subject"] == "anatomy"
    assert mm.records[4].question.startswith('The "anatomical snuffbox"')


def test_generic_jsonl_types():
    ds = load_dataset(f"jsonl:{FIX}/generic.jsonl")
    types = {r.id: r.question_type for r in ds}
    assert types == {"g1": "open", "g2": "multiple_choice", "g3": "yes_no_maybe",
                     "g4": "case_diagnosis", "g5": "medication"}
    assert MedicalRecord.from_dict(ds.records[1].to_dict()) == ds.records[1]


# (ref, first bad location suffix, reason fragment, lenient kept, lenient skipped)
MALFORMED = [
    ("medqa:{F}/medqa_malformed.jsonl", "medqa_malformed.jsonl:2", "answer_idx='E'", 1, 5),
    ("medmcqa:{F}/medmcqa_malformed.json", "medmcqa_malformed.json:2", "cop=5", 2, 4),
    ("mmlu:{F}/mmlu_malformed.csv", "mmlu_malformed.csv:2", "expected 6 columns", 2, 4),
    ("pubmedqa:{F}/pubmedqa_malformed/ori_pqal.json", "ori_pqal.json:10000002", "final_decision='probably'", 2, 3),
    ("instruction:{F}/instruction_malformed.json", "instruction_malformed.json:[1]", "'output'", 2, 3),
    ("jsonl:{F}/generic_malformed.jsonl", "generic_malformed.jsonl:2", "answer='Z'", 1, 4),
]


@pytest.mark.parametrize("ref, location, reason, kept, skipped", MALFORMED)
def test_malformed_strict_and_lenient(ref, location, reason, kept, skipped):
    ref = ref.format(F=FIX)
    with pytest.raises(DataFormatError) as err:
        load_dataset(ref)
    message = str(err.value)
    assert location in message and reason in message
    ds = load_dataset(ref, lenient=True)
    assert len(ds) == kept and len(ds.skipped) == skipped
    assert all(s.reason and ":" in s.location for s in ds.skipped)


def test_malformed_details():
    ds = load_dataset(f"medqa:{FIX}/medqa_malformed.jsonl", lenient=True)
    by_line = {s.location.rsplit(":", 1)[1]: s.reason for s in ds.skipped}
    assert set(by_line) == {"2", "4", "5", "6", "7"}  # line 3 is blank, not a record
    assert "invalid JSON" in by_line["4"] and "'1'" in by_line["5"] and "'question'" in by_line["6"]
    mmlu = load_dataset(f"mmlu:{FIX}/mmlu_malformed.csv", lenient=True)
    assert [s.location.rsplit(":", 1)[1] for s in mmlu.skipped] == ["2", "3", "4", "5"]  # row 5 spans 5-6
    pqa = load_dataset(f"pubmedqa:{FIX}/pubmedqa_malformed/ori_pqal.json#test", lenient=True)
    assert [r.id for r in pqa] == ["10000005"] and len(pqa.skipped) == 1


def test_medquad_malformed_xml():
    with pytest.raises(DataFormatError) as err:
        load_dataset(f"medquad:{FIX}/medquad_malformed")
    assert "broken.xml:" in str(err.value) and "invalid XML" in str(err.value)
    ds = load_dataset(f"medquad:{FIX}/medquad_malformed", lenient=True)
    assert [r.id for r in ds] == ["medquad-HANDMADE-9000001-1"]
    reasons = sorted(s.reason for s in ds.skipped)
    assert any("empty or missing <Answer>" in r for r in reasons)
    assert any("empty or missing <Question>" in r for r in reasons)
    assert any("invalid XML" in r for r in reasons)
    assert any(s.location.endswith("good.xml:QAPair[1]") for s in ds.skipped)


def test_whole_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"medqa:{tmp_path}/nope.jsonl")
    bad = tmp_path / "ori_pqal.json"
    bad.write_text('{"1": {"QUESTION": "x",\n')
    with pytest.raises(DataFormatError, match=r"ori_pqal.json:2: invalid JSON"):
        load_dataset(f"pubmedqa:{bad}", lenient=True)  # an unreadable file is never "lenient"
    shutil.copy(FIX / "pubmedqa_malformed/ori_pqal.json", tmp_path / "ori_pqal.json")
    with pytest.raises(DataFormatError, match="test_ground_truth.json"):
        load_dataset(f"pubmedqa:{tmp_path}/ori_pqal.json#test")
    with pytest.raises(DataFormatError, match="no named splits"):
        load_dataset(f"medqa:{FIX}/medqa_malformed.jsonl#test")


def test_hf_without_datasets_or_hub_errors_clearly():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataFormatError, match="pip install datasets"):
            load_dataset("hf:org/name#test")
    else:
        with pytest.raises(DataFormatError, match="MEDDISTILL_ALLOW_HUB"):
            load_dataset("hf:meddistill-nonexistent/none#test")


def test_hf_row_mapping():
    from meddistill.data.loaders import _hf_record

    medmcqa = _hf_record({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2, "exp": "e"}, "x")
    assert medmcqa.answer == "C" and medmcqa.question_type == "multiple_choice"
    mmlu = _hf_record({"question": "Q?", "choices": ["w", "x", "y", "z"], "answer": 3}, "x")
    assert mmlu.answer == "D"
    pqa = _hf_record({"pubid": 1, "question": "Is it?", "context": {"contexts": ["c1", "c2"]},
                      "final_decision": "maybe", "long_answer": "la"}, "x")
    assert pqa.question_type == "yes_no_maybe" and pqa.answer == "maybe" and pqa.context == "c1\nc2"
    alpaca = _hf_record({"instruction": "Be a doctor.", "input": "My head hurts.", "output": "Rest."}, "x")
    assert alpaca.question == "My head hurts." and alpaca.answer == "Rest."


def test_question_types_constant():
    assert QUESTION_TYPES == ("multiple_choice", "yes_no_maybe", "open", "case_diagnosis", "medication")
    with pytest.raises(ValueError, match="question_type"):
        MedicalRecord("x", "q", None, None, None, "essay", "t")
