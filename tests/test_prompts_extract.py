"""Answer extraction edge cases: think blocks, letters, yes/no/maybe, option text, garbage."""
import copy

import pytest

from meddistill.data import MedicalRecord
from meddistill.prompts import TRUNCATED, extract_answer, prompt_prefills_think

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
        ("<think>Let me consider each option carefully", "truncated"),
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


@pytest.mark.parametrize(
    "text",
    [
        "<think>Option A is tempting. The answer is B because heparin",  # cut off mid-reasoning
        "Final answer: C\n<think>on second thought, A",  # a letter before an unclosed block: still cut off
        "<think>yes or no? The answer is yes",
    ],
)
def test_unclosed_think_is_truncated_never_mined(text):
    got = extract_answer(text, MC)
    assert got.answer is None and got.reason == TRUNCATED and got.final_text == ""


def test_prefilled_think_without_close_is_truncated():
    """An R1 template opened <think> in the prompt: the generation has no tags until </think>."""
    cut = "Heparin matters here, so the answer is B and not A"
    assert extract_answer(cut, MC).answer == "B"  # without the flag this reads as a plain answer
    got = extract_answer(cut, MC, prefilled_think=True)
    assert got.answer is None and got.reason == TRUNCATED and got.reasoning == cut
    done = extract_answer("A is wrong; heparin is needed.\n</think>\n\nFinal answer: B", MC, prefilled_think=True)
    assert done.answer == "B" and done.reasoning == "A is wrong; heparin is needed." and done.reason is None
    assert extract_answer("yes, clearly", "yes_no_maybe", prefilled_think=True).reason == TRUNCATED


R1_TEMPLATE = (  # the shape of DeepSeek-R1(-Distill)'s template: the generation prompt opens <think>
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)


def test_prompt_prefills_think_reads_the_chat_template():
    from meddistill.modelsource import load_tokenizer

    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    assert not prompt_prefills_think(tokenizer)
    r1 = copy.deepcopy(tokenizer)
    r1.chat_template = R1_TEMPLATE
    assert prompt_prefills_think(r1) and prompt_prefills_think(r1, style="plain")
    r1.chat_template = R1_TEMPLATE.replace("<think>\n", "<think>\n</think>\n\n")  # opened and closed: no prefill
    assert not prompt_prefills_think(r1)
    assert not prompt_prefills_think(None)  # no template: the plain-text fallback never opens <think>
