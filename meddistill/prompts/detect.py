"""Rule-based question-type detection for records whose source format does not say.

Order matters and is the whole algorithm:
  options -> multiple_choice; context + a yes/no-style question -> yes_no_maybe;
  dosage/medication wording -> medication; a clinical vignette asking for a diagnosis ->
  case_diagnosis; everything else -> open.
"""
from __future__ import annotations

import re

# A question that can be answered yes/no starts with an auxiliary verb.
_YES_NO_START = re.compile(
    r"^\s*(is|are|was|were|do|does|did|can|could|should|would|will|has|have|had|may|might|must)\b",
    re.IGNORECASE,
)
# Dosage wording is specific enough anywhere in the text ...
_DOSAGE = re.compile(
    r"\b(dos(e|es|age|ages|ing)|\d+(\.\d+)?\s*(mg|mcg|µg|g|ml|iu|units?)(/\w+)?|milligrams?|micrograms?|"
    r"overdos\w*|side[- ]effects?|contraindicat\w*|drug interactions?|"
    r"how (much|often|many times|long) (should|do|can|must) (i|he|she|you|we|they) take|"
    r"twice (a|per) day|once (a|per) day|b\.i\.d|t\.i\.d|q\.i\.d|mg/kg)\b",
    re.IGNORECASE,
)
# ... but "medication"/"drug" only counts in the sentence that asks, not in the patient's story
# ("I have a cough despite taking medication. What could be the problem?" is not a drug question).
_DRUG_WORD = re.compile(
    r"\b(medications?|medicines?|drugs?|prescri(be|bed|ption)s?|pills?|tablets?|capsules?|antibiotics?|"
    r"(can|should|may|must) (i|he|she|you|we|they) (take|use|give|stop taking)|safe to take)\b",
    re.IGNORECASE,
)
# "A 45-year-old man presents with ...", "A 3-week-old girl is brought ...", "32 yo F with ..."
_VIGNETTE = re.compile(
    r"\b\d{1,3}[- ](year|month|week|day)s?[- ]old\b|\b\d{1,3}\s*(yo|y/o|y\.o\.)\b",
    re.IGNORECASE,
)
_PRESENTS = re.compile(
    r"\b(presents?|presenting|is brought|comes to|came to|was admitted|is admitted|complains? of|"
    r"history of|on examination|physical examination)\b",
    re.IGNORECASE,
)
_DIAGNOSIS_ASK = re.compile(
    r"\b(diagnos\w*|most likely (cause|condition|disease|explanation|etiology)|what (condition|disease) "
    r"(does|do|might|could)|what is wrong|differential|what does (he|she|the patient) have)\b",
    re.IGNORECASE,
)


def detect_question_type(
    question: str, options: dict[str, str] | None = None, context: str | None = None
) -> str:
    """Return one of `QUESTION_TYPES` for a question, from its shape and wording alone."""
    if options:
        return "multiple_choice"
    text = question or ""
    if context and context.strip() and _YES_NO_START.search(text):
        return "yes_no_maybe"
    asking = _asking_sentence(text)
    is_medication = bool(_DOSAGE.search(text) or _DRUG_WORD.search(asking))
    if _VIGNETTE.search(text) and _DIAGNOSIS_ASK.search(asking):
        return "case_diagnosis"
    if is_medication:
        return "medication"
    if _VIGNETTE.search(text) and _PRESENTS.search(text):
        return "case_diagnosis"
    return "open"


def _asking_sentence(text: str) -> str:
    """The sentence that asks: the last one ending in '?', else the last sentence."""
    parts = [p for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p.strip()]
    questions = [p for p in parts if p.rstrip().endswith("?")]
    return questions[-1] if questions else (parts[-1] if parts else text)
