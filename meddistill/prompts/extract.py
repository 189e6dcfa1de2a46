"""Read the final answer out of a model's generated text. Never raises.

Order: split off <think> reasoning (closed, or closed without an opening tag when the prompt
pre-filled it); a generation that ended inside its reasoning (an unclosed <think>, or no </think>
when the prompt pre-filled <think>) is answer=None, reason="truncated", never mined for a letter
(the reasoning mentions every option); then try, on the text after the reasoning, the template's final-line
pattern, "the answer is ..." phrasings, a bare label, and (multiple choice) an option's text
quoted verbatim. Anything else is answer=None with a human-readable reason, which callers log
and count as wrong.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from meddistill.data.records import OPTION_LETTERS, YES_NO_MAYBE, MedicalRecord
from meddistill.prompts.render import get_template

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_FINAL = re.compile(r"final\s+answer\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)
# Explicit phrasings; the letter may be lower case only when nothing alphabetic follows it,
# so "the answer is a condition..." is not read as option A. "answer" phrases outrank
# "option"/"choice" ones: in "the answer is C, not option A" the answer is C.
_LETTER_AFTER = (r"\s*(?i:is|would\s+be)?\s*[:\-]?\s*\**\s*[\(\[]?\s*"
                 r"(?:([A-E])(?![A-Za-z])|([a-e])(?=\s*[\)\].,;:!*]|\s*$))")
_ANSWER_LETTER = re.compile(r"(?i:answer)" + _LETTER_AFTER)
_OPTION_LETTER = re.compile(r"(?i:option|choice)" + _LETTER_AFTER)
_LEADING_LETTER = re.compile(r"^\W{0,3}([A-E])(?:\s*[\)\].:*]|\s*$|\s+-\s)")
_LABEL_WORD = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)
TRUNCATED = "truncated"  # Extraction.reason of a generation cut off inside its <think> block


@dataclass(frozen=True)
class Extraction:
    answer: str | None  # a letter, yes/no/maybe, or free text; None when nothing parseable
    reasoning: str | None  # the text inside <think>...</think>, if any
    final_text: str  # the text after the reasoning, stripped
    reason: str | None  # why answer is None (or how a fallback matched); None for a clean parse


def split_reasoning(text: str, prefilled_think: bool = False) -> tuple[str | None, str, bool]:
    """(reasoning, final_text, think_unclosed) for a generation.

    `prefilled_think`: the prompt ended with an open <think> (R1 chat templates), so the whole
    generation is reasoning until a </think>.
    """
    opened = _THINK_OPEN.search(text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        last = closes[-1]
        start = opened.end() if opened and opened.start() < last.start() else 0
        return text[start:last.start()].strip(), text[last.end():].strip(), False
    if opened:
        return text[opened.end():].strip(), text[:opened.start()].strip(), True
    if prefilled_think:
        return text.strip(), "", True
    return None, text.strip(), False


def extract_answer(
    text: str,
    record_or_question_type: "MedicalRecord | str",
    options: dict[str, str] | None = None,
    *,
    prefilled_think: bool = False,
) -> Extraction:
    """Parse the final answer of `text` for a record (or a bare question type).

    `prefilled_think`: the prompt already opened <think> (see render.prompt_prefills_think).
    """
    try:
        if isinstance(record_or_question_type, MedicalRecord):
            question_type = record_or_question_type.question_type
            options = options if options is not None else record_or_question_type.options
        else:
            question_type = str(record_or_question_type)
        return _extract(text or "", question_type, options, prefilled_think)
    except Exception as err:  # noqa: BLE001 - extraction must never break an evaluation run
        return Extraction(None, None, str(text or "").strip(), f"extractor error: {type(err).__name__}: {err}")


def _extract(text: str, question_type: str, options: dict[str, str] | None, prefilled_think: bool) -> Extraction:
    reasoning, final_text, unclosed = split_reasoning(text, prefilled_think)
    if unclosed:
        return Extraction(None, reasoning, "", TRUNCATED)
    if not final_text:
        return Extraction(None, reasoning, "", "empty answer after the reasoning" if reasoning else "empty output")
    by_template = _match_template(final_text, question_type, options)
    if by_template is not None:
        return Extraction(by_template, reasoning, final_text, None)
    if options or question_type == "multiple_choice":
        answer, reason = _parse_choice(final_text, options)
    elif question_type == "yes_no_maybe":
        answer, reason = _parse_yes_no_maybe(final_text)
    else:
        answer, reason = _parse_free_text(final_text)
    return Extraction(answer, reasoning, final_text, reason)


def _match_template(text: str, question_type: str, options: dict[str, str] | None) -> str | None:
    """The answer captured by the template's own final-line pattern (last occurrence), if valid."""
    pattern = get_template(question_type).answer_pattern
    hits = list(re.finditer(pattern, text)) if pattern else []
    if not hits:
        return None
    value = hits[-1].group(1).strip()
    if question_type == "multiple_choice":
        return value if value in (options or OPTION_LETTERS) else None
    if question_type == "yes_no_maybe":
        return value.lower()
    return value or None


def _parse_choice(text: str, options: dict[str, str] | None) -> tuple[str | None, str | None]:
    letters = sorted(options) if options else list(OPTION_LETTERS)
    found = _last_letter(text)
    if found is None:
        lead = _LEADING_LETTER.match(text)
        found = lead.group(1) if lead else None
    if found is not None:
        if found in letters:
            return found, None
        return None, f"letter {found} is not one of the options {''.join(letters)}"
    if options:
        by_text = _match_option_text(text, options)
        if by_text:
            return by_text, "matched an option's text verbatim"
    return None, f"no option letter ({''.join(letters)}) found in {_clip(text)!r}"


def _last_letter(text: str) -> str | None:
    """The letter of the last explicit 'final answer'/'answer is' phrase, upper-cased."""
    hits = list(_ANSWER_LETTER.finditer(text)) or list(_OPTION_LETTER.finditer(text))
    if not hits:
        return None
    m = hits[-1]
    return (m.group(1) or m.group(2)).upper()


def _match_option_text(text: str, options: dict[str, str]) -> str | None:
    norm = _normalize(text)
    hits = {k: _normalize(v) for k, v in options.items() if _normalize(v) and _normalize(v) in norm}
    # Drop options whose text is part of another matched option ("aspirin" vs "aspirin and heparin").
    hits = {k: v for k, v in hits.items() if not any(v != w and v in w for w in hits.values())}
    return next(iter(hits)) if len(hits) == 1 else None


def _parse_yes_no_maybe(text: str) -> tuple[str | None, str | None]:
    final = list(_FINAL.finditer(text))
    if final:
        tail = text[final[-1].end():]
        m = re.match(r"\W*(yes|no|maybe)\b", tail, re.IGNORECASE)
        if m:
            return m.group(1).lower(), None
    m = re.search(r"answer\s*(?:is|:)\s*\W*(yes|no|maybe)\b", text, re.IGNORECASE)
    if m:
        return m.group(1).lower(), None
    m = re.match(r"\W*(yes|no|maybe)\b", text, re.IGNORECASE)
    first_clause = re.split(r"[.,;:!?\n]", text.strip(), maxsplit=1)[0]
    if m and len({w.lower() for w in _LABEL_WORD.findall(first_clause)}) == 1:  # not "Yes and no, ..."
        return m.group(1).lower(), None
    labels = {w.lower() for w in _LABEL_WORD.findall(text)}
    if len(labels) == 1:
        return labels.pop(), "the only yes/no/maybe word in the text"
    if labels:
        return None, f"ambiguous: several of yes/no/maybe ({', '.join(sorted(labels))}) and no final line"
    return None, f"no yes/no/maybe found in {_clip(text)!r}"


def _parse_free_text(text: str) -> tuple[str | None, str | None]:
    final = list(_FINAL.finditer(text))
    answer = text[final[-1].end():].strip() if final else text.strip()
    if not answer:
        return None, "empty text after 'Final answer:'"
    return answer, None


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9%]+", " ", text.lower()).split())


def _clip(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# YES_NO_MAYBE is re-exported for callers that check labels next to extraction.
__all__ = ["TRUNCATED", "Extraction", "extract_answer", "split_reasoning", "YES_NO_MAYBE"]
