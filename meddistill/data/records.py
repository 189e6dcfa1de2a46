"""The one normalized record every loader produces and every stage consumes.

A `MedicalRecord` is format-free: multiple choice questions carry their options as letters,
PubMedQA carries its abstract as `context`, open questions carry a free-text reference answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QUESTION_TYPES = ("multiple_choice", "yes_no_maybe", "open", "case_diagnosis", "medication")
OPTION_LETTERS = ("A", "B", "C", "D", "E")
YES_NO_MAYBE = ("yes", "no", "maybe")


@dataclass(frozen=True)
class MedicalRecord:
    """One medical question with its reference answer.

    `answer` is a letter for multiple choice, "yes"/"no"/"maybe" for PubMedQA-style questions and
    free text for open questions (None when unlabelled). `reasoning` is an optional worked
    explanation (e.g. MedMCQA's `exp`, or a teacher's chain of thought); `meta` keeps whatever the
    source had that the pipeline does not need (year, qtype, step, ...).
    """

    id: str
    question: str
    options: dict[str, str] | None
    context: str | None
    answer: str | None
    question_type: str
    source: str
    reasoning: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.question_type not in QUESTION_TYPES:
            raise ValueError(
                f"MedicalRecord {self.id!r}: question_type={self.question_type!r} is not one of {QUESTION_TYPES}"
            )
        if self.options is not None:
            bad = [k for k in self.options if k not in OPTION_LETTERS]
            if bad:
                raise ValueError(
                    f"MedicalRecord {self.id!r}: option keys {bad} are not letters {OPTION_LETTERS}"
                )

    @property
    def is_scored_by_choice(self) -> bool:
        """True when the answer is a closed label (a letter or yes/no/maybe), so accuracy applies."""
        if self.answer is None:
            return False
        if self.options:
            return self.answer in self.options
        return self.question_type == "yes_no_maybe" and self.answer in YES_NO_MAYBE

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "options": dict(self.options) if self.options is not None else None,
            "context": self.context,
            "answer": self.answer,
            "question_type": self.question_type,
            "source": self.source,
            "reasoning": self.reasoning,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MedicalRecord":
        options = data.get("options")
        return cls(
            id=str(data["id"]),
            question=data["question"],
            options={str(k): str(v) for k, v in options.items()} if options else None,
            context=data.get("context"),
            answer=data.get("answer"),
            question_type=data["question_type"],
            source=data.get("source", "jsonl"),
            reasoning=data.get("reasoning"),
            meta=dict(data.get("meta") or {}),
        )
