"""Paired comparisons of two models on the same questions: McNemar's exact test, a paired
bootstrap, and a verdict in plain words.

Two models answered the same questions, so their accuracies are not independent samples: only
the questions where they disagree (discordant pairs) carry information about which is better.

    b01, b10, p = mcnemar_exact(teacher_correct, student_correct)
    boot = paired_bootstrap(teacher_correct, student_correct)      # diff and retention intervals
    verdict("student", "teacher", boot.diff, p, n=len(teacher_correct))
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

ALPHA = 0.05


def mcnemar_exact(a_correct: list[bool], b_correct: list[bool]) -> tuple[int, int, float]:
    """(b01, b10, p): b01 = only b right, b10 = only a right; p two-sided exact binomial (1/2)."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired answers differ in length ({len(a_correct)} vs {len(b_correct)}); pair them by question id")
    b01 = sum(1 for a, b in zip(a_correct, b_correct) if not a and b)
    b10 = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    n = b01 + b10
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(b01, b10) + 1)) / 2**n
    return b01, b10, min(1.0, 2 * tail)


@dataclass
class Bootstrap:
    diff: float  # accuracy of b - accuracy of a, in [-1, 1]
    diff_low: float
    diff_high: float
    ratio: float | None  # accuracy of b / accuracy of a (None when a got nothing right)
    ratio_low: float | None
    ratio_high: float | None


def paired_bootstrap(a_correct: list[bool], b_correct: list[bool], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Bootstrap:
    """Percentile intervals of acc(b) - acc(a) and acc(b) / acc(a), resampling questions (pairs kept)."""
    n = len(a_correct)
    if n != len(b_correct) or n == 0:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty answer lists (got {n} and {len(b_correct)})")
    a = [int(x) for x in a_correct]
    b = [int(x) for x in b_correct]
    rng = random.Random(seed)
    diffs, ratios = [], []
    for _ in range(n_boot):
        idx = rng.choices(range(n), k=n)
        sa, sb = sum(a[i] for i in idx), sum(b[i] for i in idx)
        diffs.append((sb - sa) / n)
        if sa:  # a resample where a got nothing right has no ratio; it is left out, not counted as inf
            ratios.append(sb / sa)
    tail = (1 - level) / 2
    acc_a, acc_b = sum(a) / n, sum(b) / n
    d_lo, d_hi = _percentile(diffs, tail), _percentile(diffs, 1 - tail)
    if not acc_a or not ratios:
        return Bootstrap(acc_b - acc_a, d_lo, d_hi, None, None, None)
    return Bootstrap(acc_b - acc_a, d_lo, d_hi, acc_b / acc_a, _percentile(ratios, tail), _percentile(ratios, 1 - tail))


def verdict(better: str, than: str, diff: float, p: float, n: int, alpha: float = ALPHA) -> str:
    """Plain words for "is `better` better than `than`": diff = acc(better) - acc(than) in [-1, 1]."""
    if p >= alpha or diff == 0:
        return f"no significant difference at n = {n} ({_p(p)})"
    direction = "better" if diff > 0 else "worse"
    return f"{better} {direction} than {than} by {100 * diff:+.1f} points at n = {n} ({_p(p)})"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
