"""Prompt templates, question-type detection and rendering (through a real chat template)."""
import pytest

from meddistill.data import MedicalRecord, load_dataset
from meddistill.prompts import build_messages, detect_question_type, get_template, render_prompt, render_target
from meddistill.prompts.render import render_fallback

MC = MedicalRecord("mc1", "Which vitamin deficiency causes scurvy?", {"A": "Vitamin A", "B": "Vitamin C",
                   "C": "Vitamin D", "D": "Vitamin K", "E": "Vitamin B12"}, None, "B", "multiple_choice", "t",
                   reasoning="Scurvy is ascorbic acid deficiency.")
YNM = MedicalRecord("y1", "Does smoking cessation reduce cardiovascular risk?", None,
                    "RESULTS: quitting halved the risk of myocardial infarction.", "yes", "yes_no_maybe", "t")
OPEN = MedicalRecord("o1", "What are the symptoms of tetanus?", None, None, "Muscle stiffness and spasms.", "open", "t")


@pytest.mark.parametrize(
    "question, options, context, expected",
    [
        ("Which is a bone?", {"A": "femur", "B": "liver"}, None, "multiple_choice"),
        ("Is aspirin effective after stroke?", None, "A trial of 1,000 patients ...", "yes_no_maybe"),
        ("Is aspirin effective after stroke?", None, None, "open"),
        ("What is the usual adult dose of amoxicillin for otitis media?", None, None, "medication"),
        ("Can I take ibuprofen with warfarin?", None, None, "medication"),
        ("How much paracetamol is 15 mg/kg for a 20 kg child?", None, None, "medication"),
        ("A 45-year-old man presents with crushing chest pain radiating to the left arm. "
         "What is the most likely diagnosis?", None, None, "case_diagnosis"),
        ("A 6-month-old girl is brought to the clinic with a barking cough and stridor.", None, None, "case_diagnosis"),
        ("A 30-year-old woman presents with a urinary tract infection. Which antibiotic should be prescribed?",
         None, None, "medication"),
        ("Doctor, I have a cough despite taking medication. What could be the problem?", None, None, "open"),
        ("What are the symptoms of Gas in the Digestive Tract ?", None, None, "open"),
    ],
)
def test_detect_question_type(question, options, context, expected):
    assert detect_question_type(question, options, context) == expected


def test_every_type_has_a_template_with_both_styles():
    for qtype in ("multiple_choice", "yes_no_maybe", "open", "case_diagnosis", "medication"):
        t = get_template(qtype)
        assert t.system and set(t.instructions) == {"plain", "r1"} and "{answer}" in t.final_line
    with pytest.raises(ValueError, match="no template"):
        get_template("essay")


def test_build_messages_content():
    system, user = build_messages(MC, "plain")
    assert system["role"] == "system" and user["role"] == "user"
    assert "E. Vitamin B12" in user["content"] and "A, B, C, D or E" in user["content"]
    assert '"Final answer: <letter>"' in user["content"] and "<think>" not in user["content"]
    assert "Final answer: X" not in user["content"]  # a placeholder letter gets copied by small models
    assert "<think>" in build_messages(MC, "r1")[1]["content"]
    ynm = build_messages(YNM)[1]["content"]
    assert ynm.startswith("Context:\nRESULTS") and "Final answer: maybe" in ynm
    with pytest.raises(ValueError, match="style"):
        build_messages(MC, "cot")


def test_render_target_styles():
    assert render_target(MC) == "Final answer: B"
    assert render_target(MC, "r1") == "<think>\nScurvy is ascorbic acid deficiency.\n</think>\n\nFinal answer: B"
    assert render_target(YNM, "r1", reasoning="It halved.") == "<think>\nIt halved.\n</think>\n\nFinal answer: yes"
    assert render_target(YNM, "r1") == "<think>\n\n</think>\n\nFinal answer: yes"
    assert render_target(OPEN) == "Muscle stiffness and spasms."
    with pytest.raises(ValueError, match="no answer"):
        render_target(MedicalRecord("n", "q", None, None, None, "open", "t"))


def test_render_through_real_chat_template():
    from meddistill.modelsource import load_tokenizer

    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    record = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test", limit=1).records[0]
    prompt = render_prompt(record, tok, "plain")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert record.question in prompt and "Final answer: yes" in prompt


class _NoTemplate:
    chat_template = None


class _NoSystemRole:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return "<user>" + messages[0]["content"] + "<model>"


def test_render_fallbacks():
    assert render_prompt(MC, _NoTemplate()) == render_fallback(build_messages(MC))
    assert render_prompt(MC, _NoTemplate()).endswith("\n\nAssistant:")
    merged = render_prompt(MC, _NoSystemRole())
    assert merged.startswith("<user>You are a careful medical expert") and "Vitamin B12" in merged
