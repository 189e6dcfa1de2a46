"""Cross-tokenizer pairing of answer tokens by character offsets (for ULD).

Teacher and student tokenize the same answer text differently ("12345" may be one token for one
tokenizer and five digits for another), so pairing the i-th tokens drifts apart after the first
split. Instead each token is located by the character where it ends in the answer text
(`return_offsets_mapping`, fast tokenizers), and:

    student token i is paired with the first teacher token whose span ends at or after the
    student token's end: the teacher token that covers the student token's last character
    (the one ending at the same position when both tokenizers cut there).

Several student tokens may share one teacher token (the student splits finer); student tokens
beyond the teacher's (truncated) answer get no partner and are left out of the loss. The
end-of-sequence token, whose text differs between tokenizers, ends one past the answer text, so
the two EOS tokens pair with each other.
"""
from __future__ import annotations

import bisect


def answer_char_ends(tokenizer, answer: str, eos: str, n_tokens: int) -> list[int]:
    """Character end offset in `answer` of each of the first `n_tokens` tokens of answer + eos.

    Tokenized exactly as sft_data.tokenize_example tokenizes a target (answer + eos, no special
    tokens added), so the i-th offset belongs to the i-th answer label.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"spec.distillation.mode=cross-tokenizer aligns tokens by character offsets, which needs a fast "
            f"tokenizer; {type(tokenizer).__name__} is not one (use a model with tokenizer.json, or mode: sequence)"
        )
    offsets = tokenizer(answer + eos, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) < n_tokens:
        raise ValueError(f"answer {answer[:40]!r} tokenizes to {len(offsets)} tokens, fewer than its {n_tokens} labels")
    ends, last = [], 0
    for _, end in offsets[:n_tokens]:
        end = min(end, len(answer) + 1)  # any part of the EOS text is "one past the answer"
        last = max(last, end)  # zero-width tokens (some byte fallbacks) keep their predecessor's end
        ends.append(last)
    return ends


def align_by_char_end(student_ends: list[int], teacher_ends: list[int]) -> list[int | None]:
    """For each student token, the index of its teacher token (rule above), None when there is none."""
    return [
        j if (j := bisect.bisect_left(teacher_ends, end)) < len(teacher_ends) else None
        for end in student_ends
    ]
