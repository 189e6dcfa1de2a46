"""Paired statistics of the results table, against values computed by hand."""
from __future__ import annotations

import pytest

from meddistill.evaluation.stats import mcnemar_exact, paired_bootstrap, verdict


def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


@pytest.mark.parametrize(
    ("only_a", "only_b", "p"),
    [
        (6, 0, 2 / 2**6),                    # 0.03125: all six discordant pairs go one way
        (0, 6, 2 / 2**6),                    # two-sided: the other way round is as unlikely
        (8, 2, 2 * (1 + 10 + 45) / 2**10),   # 0.109375
        (3, 3, 1.0),                         # 2 * 42/64 > 1: capped
        (0, 0, 1.0),                         # no discordant pairs, no evidence
    ],
)
def test_mcnemar_exact_two_sided_binomial(only_a, only_b, p):
    a, b = _pairs(20, only_a, only_b, 5)
    b01, b10, p_value = mcnemar_exact(a, b)
    assert (b01, b10) == (only_b, only_a)
    assert p_value == pytest.approx(p, abs=1e-12)


def test_mcnemar_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="pair them by question id"):
        mcnemar_exact([True, False], [True])


def test_bootstrap_of_identical_answers_has_a_zero_width_interval():
    a, _ = _pairs(25, 0, 0, 15)
    boot = paired_bootstrap(a, a)
    assert (boot.diff, boot.diff_low, boot.diff_high) == (0.0, 0.0, 0.0)
    assert (boot.ratio, boot.ratio_low, boot.ratio_high) == (1.0, 1.0, 1.0)


def test_bootstrap_interval_of_a_clear_loss_excludes_zero_and_contains_the_estimate():
    a, b = _pairs(24, 6, 0, 10)  # 30/40 -> 24/40
    boot = paired_bootstrap(a, b, n_boot=2000, seed=1)
    assert boot.diff == pytest.approx(-0.15)
    assert boot.diff_low < -0.15 < boot.diff_high < 0
    assert boot.ratio == pytest.approx(0.8)
    assert boot.ratio_low < 0.8 < boot.ratio_high < 1
    assert paired_bootstrap(a, b, n_boot=2000, seed=1) == boot  # seeded: reproducible


def test_bootstrap_has_no_ratio_when_the_reference_got_nothing_right():
    a, b = _pairs(0, 0, 4, 6)
    boot = paired_bootstrap(a, b)
    assert boot.diff == pytest.approx(0.4) and boot.ratio is None and boot.ratio_low is None


def test_verdict_in_plain_words():
    assert verdict("student", "teacher", 0.025, 0.62, 40) == "no significant difference at n = 40 (p = 0.62)"
    assert verdict("student", "teacher", 0.125, 0.0078125, 40) == "student better than teacher by +12.5 points at n = 40 (p = 0.008)"
    assert verdict("quantized", "student", -0.15, 0.03125, 40) == "quantized worse than student by -15.0 points at n = 40 (p = 0.031)"
    assert verdict("teacher", "base", 0.3, 1e-5, 500).endswith("(p < 0.001)")
