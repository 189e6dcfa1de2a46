"""Answer extraction edge cases: think blocks, letters, yes/no/maybe, option text, garbage."""
import pytest

from meddistill.data import MedicalRecord
from meddistill.prompts import extract_answer

OPTIONS = {"A": "Aspirin", "B": "Aspirin and heparin", "C": "Warfarin", "D": "Report the physician to the ethics committee"}
MC = MedicalRecord("m", "Which drug?", OPTIONS, None, "B", "multiple_choice", "t")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Final answer: B", "B"),
        ("final answer: c", "C"),
        ("Answer: (B)", "B"),
        ("The answer is b.", "B"),
        ("**B**", "B"),
        ("B) Aspirin and heparin", "B"),
        ("C", "C"),
        ("Option A is tempting, but the answer is C.", "C"),
        ("The answer is C, not option A.", "C"),
        ("I pick option D", "D"),
        ("<think>Maybe A? No, heparin is needed.</think>\nFinal answer: B", "B"),
        ("<think>a\n</think>\n<think>b</think> Final answer: D", "D"),
        ("Reasoning without opening tag.</think>\n\nFinal answer: A", "A"),
        ("I would report the physician to the ethics committee.", "D"),
        ("aspirin and heparin", "B"),  # 'aspirin' alone is part of B's text: B wins, not ambiguity
    ],
)
def test_multiple_choice(text, expected):
    got = extract_answer(text, MC)
    assert got.answer == expected, got


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<think>Let me consider each option carefully", "unclosed <think>"),
        ("", "empty output"),
        ("<think>done</think>", "empty answer after the reasoning"),
        ("I am not sure, it could be anything.", "no option letter"),
        ("the answer is a condition called gout", "no option letter"),
        ("Final answer: E", "letter E is not one of the options"),
        ("Warfarin or aspirin", "no option letter"),  # two options quoted: ambiguous
    ],
)
def test_multiple_choice_unparsed_has_reason(text, reason):
    got = extract_answer(text, MC)
    assert got.answer is None and reason in got.reason


def test_think_block_is_returned_as_reasoning():
    got = extract_answer("<think>\nstep 1\nstep 2\n</think>\n\nFinal answer: C", MC)
    assert got.reasoning == "step 1\nstep 2" and got.final_text == "Final answer: C" and got.reason is None
    unclosed = extract_answer("<think>step 1", MC)
    assert unclosed.reasoning == "step 1" and unclosed.final_text == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Final answer: yes", "yes"),
        ("No.", "no"),
        ("Maybe, the evidence is weak.", "maybe"),
        ("The answer is yes. The study shows no harm.", "yes"),
        ("<think>no data? yes there is</think>\nFINAL ANSWER: No", "no"),
        ("Based on the abstract, yes.", "yes"),
    ],
)
def test_yes_no_maybe(text, expected):
    assert extract_answer(text, "yes_no_maybe").answer == expected


@pytest.mark.parametrize("text", ["Yes and no, it depends.", "The study is about statins.", None, 42])
def test_yes_no_maybe_unparsed_never_raises(text):
    got = extract_answer(text, "yes_no_maybe")
    assert got.answer is None and got.reason


def test_open_and_case_answers():
    assert extract_answer("<think>x</think>Rest and fluids.", "open").answer == "Rest and fluids."
    assert extract_answer("Findings fit.\nFinal answer: Myocardial infarction", "case_diagnosis").answer == \
        "Myocardial infarction"
    assert extract_answer("Final answer: 500 mg twice daily", "medication").answer == "500 mg twice daily"
    assert extract_answer("Final answer:", "medication").answer is None


def test_question_type_with_explicit_options():
    got = extract_answer("Final answer: B", "multiple_choice", options={"A": "x", "B": "y"})
    assert got.answer == "B"
    assert extract_answer("Final answer: C", "multiple_choice", options={"A": "x", "B": "y"}).answer is None
