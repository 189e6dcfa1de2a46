"""Training examples keep the question and the answer in the right proportions."""
from __future__ import annotations

import pytest

from meddistill.data import MedicalRecord
from meddistill.jobs.sft_data import IGNORE, tokenize_example


@pytest.fixture(scope="module")
def tokenizer():
    from meddistill.modelsource import load_tokenizer

    return load_tokenizer("builtin:smollm2-135m-instruct")


def _open(answer: str) -> MedicalRecord:
    return MedicalRecord(id="q", question="What is hypertension and how is it treated?", options=None, context=None,
                         answer=answer, question_type="open", source="test")


def test_long_free_text_answer_keeps_the_whole_question(tokenizer):
    example = tokenize_example(_open("High blood pressure. " * 200), tokenizer, "plain", 128)
    n_prompt = sum(label == IGNORE for label in example["labels"])
    assert len(example["input_ids"]) == 128
    text = tokenizer.decode(example["input_ids"][:n_prompt])
    assert "What is hypertension and how is it treated?" in text
    assert "system" in text  # the chat template's system turn survives too
    assert n_prompt < 64 and 128 - n_prompt >= 64


def test_short_answer_is_kept_whole_with_eos(tokenizer):
    example = tokenize_example(_open("High blood pressure."), tokenizer, "plain", 128)
    answer = [t for t in example["labels"] if t != IGNORE]
    assert tokenizer.decode(answer).startswith("High blood pressure.")
    assert answer[-1] == tokenizer.eos_token_id


def test_an_r1_prompt_that_opens_think_is_not_followed_by_a_second_think(tokenizer):
    """DeepSeek-R1(-Distill) chat templates end the generation prompt with "<think>\\n"; the r1 target opens
    <think> too. Trained as "<think>\\n<think>", the model writes two opening tags at inference."""
    import copy

    from tests.test_prompts_extract import R1_TEMPLATE

    r1 = copy.deepcopy(tokenizer)
    r1.chat_template = R1_TEMPLATE
    record = MedicalRecord(id="q", question="Is aspirin an antiplatelet drug?", options=None, context=None,
                           answer="yes", question_type="yes_no_maybe", source="test", reasoning="It inhibits COX-1.")
    example = tokenize_example(record, r1, "r1", 256)
    text = r1.decode(example["input_ids"])
    assert text.split("<|Assistant|>")[1].startswith("<think>\nIt inhibits COX-1.\n</think>"), text  # one <think>
    answer = r1.decode([t for t in example["labels"] if t != IGNORE])
    assert answer.startswith("It inhibits COX-1.\n</think>"), answer  # the prompt's <think> is not a label
    # A template that does not open <think> keeps the target's own.
    plain = tokenize_example(record, tokenizer, "r1", 256)
    assert tokenizer.decode([t for t in plain["labels"] if t != IGNORE]).startswith("<think>\nIt inhibits COX-1.")
