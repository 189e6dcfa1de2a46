"""Remove training records that leak evaluation questions.

Two checks, as in the GPT-3 (Brown et al. 2020, appendix C) and Llama-2 contamination studies:
  1. exact match of the normalized question text;
  2. any shared 13-gram of words between a training record's text (question, context and
     option texts) and an evaluation record's text.
Every removal is reported with the training id, the evaluation id it collided with and why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from meddistill.data.records import MedicalRecord

NGRAM = 13


@dataclass
class DecontaminationReport:
    kept: list[MedicalRecord]
    removed: list[tuple[str, str, str]] = field(default_factory=list)  # (train_id, eval_id, reason)

    def to_dict(self) -> dict:
        return {"kept": len(self.kept), "removed": [list(r) for r in self.removed]}


def normalize_text(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", (text or "").lower()).split())


def _record_words(record: MedicalRecord) -> list[str]:
    parts = [record.question, record.context or ""] + list((record.options or {}).values())
    return normalize_text(" ".join(parts)).split()


def _ngrams(words: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def decontaminate(
    train: list[MedicalRecord], eval_sets: list[list[MedicalRecord]], n: int = NGRAM
) -> DecontaminationReport:
    """Drop training records whose question equals, or shares an n-gram with, any eval record."""
    by_question: dict[str, str] = {}
    by_ngram: dict[tuple[str, ...], str] = {}
    for eval_set in eval_sets:
        for record in eval_set:
            by_question.setdefault(normalize_text(record.question), record.id)
            for gram in _ngrams(_record_words(record), n):
                by_ngram.setdefault(gram, record.id)
    report = DecontaminationReport(kept=[])
    for record in train:
        question = normalize_text(record.question)
        if question and question in by_question:
            report.removed.append((record.id, by_question[question], "exact question match"))
            continue
        hit = next((g for g in _ngrams(_record_words(record), n) if g in by_ngram), None)
        if hit is not None:
            report.removed.append((record.id, by_ngram[hit], f"{n}-gram overlap: '{' '.join(hit)}'"))
            continue
        report.kept.append(record)
    return report
