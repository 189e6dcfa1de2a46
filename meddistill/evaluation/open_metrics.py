"""Quality of free-text answers: overlap with a reference, repetition, expected keywords.

All measures use the same words: lower-cased runs of letters and digits (punctuation dropped).
  token_f1              SQuAD-style bag-of-words F1 against the reference.
  rouge_l               ROUGE-L F-measure (beta = 1, as rouge-score's `fmeasure`): from the longest
                        common subsequence of words, P = LCS / len(prediction), R = LCS / len(reference).
  repeated_4gram_share  share of the answer's word 4-grams that repeat an earlier 4-gram of the same
                        answer (0 for answers under 4 words): 0 for fluent text, near 1 for a loop.
  is_repetitive         some 4-gram occurs more than twice: the "Lab End Lab End ..." failure.
  keyword_hit           every keyword group is hit by at least one of its alternatives
                        (case-insensitive, matched at a word start so "fever" also hits "feverish").
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall((text or "").lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 between two texts (lower-cased, punctuation dropped)."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    # One row of the classic dynamic programme: O(len(a) * len(b)) time, O(len(b)) memory.
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over words; 1.0 when both are empty, 0.0 when only one is."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _four_grams(text: str) -> list[tuple[str, ...]]:
    w = words(text)
    return [tuple(w[i:i + 4]) for i in range(len(w) - 3)]


def repeated_4gram_share(text: str) -> float:
    grams = _four_grams(text)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def is_repetitive(text: str) -> bool:
    return any(count > 2 for count in Counter(_four_grams(text)).values())


def keyword_groups(meta: dict[str, Any], record_id: str = "?") -> list[list[str]] | None:
    """The record's `meta.keywords` as groups of alternatives, None when it has none; checked."""
    groups = meta.get("keywords")
    if groups is None:
        return None
    ok = isinstance(groups, list) and groups and all(
        isinstance(g, list) and g and all(isinstance(k, str) and k.strip() for k in g) for g in groups)
    if not ok:
        raise ValueError(
            f"record {record_id!r}: meta.keywords={groups!r} must be a non-empty list of groups of "
            'alternatives, e.g. [["blood pressure"], ["heart", "cardiac"]] (all groups, any alternative)')
    return groups


def keyword_hit(text: str, groups: list[list[str]]) -> bool:
    lowered = (text or "").lower()
    return all(any(re.search(r"\b" + re.escape(k.strip().lower()), lowered) for k in group) for group in groups)
