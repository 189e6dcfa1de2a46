"""Free-text answer quality: ROUGE-L, repetition, keyword hits."""
import pytest

from meddistill.evaluation.open_metrics import (
    is_repetitive, keyword_groups, keyword_hit, repeated_4gram_share, rouge_l, token_f1,
)


def test_rouge_l_is_lcs_based():
    assert rouge_l("High blood pressure.", "high blood pressure") == 1.0
    assert rouge_l("aspirin", "heparin") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0
    # LCS of "a b c d" and "a c b d" is 3 words ("a b d" / "a c d"): P = R = 3/4
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    # order matters for ROUGE-L, not for bag-of-words F1
    assert token_f1("d c b a", "a b c d") == 1.0 and rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    # P = 2/2, R = 2/4 -> F = 2/3
    assert rouge_l("blood pressure", "high blood pressure today") == pytest.approx(2 / 3)


def test_repetition():
    assert repeated_4gram_share("three words only") == 0.0 and not is_repetitive("three words only")
    fluent = "Hypertension is high blood pressure in the arteries, which strains the heart."
    assert repeated_4gram_share(fluent) == 0.0 and not is_repetitive(fluent)
    looped = " ".join(["Lab End"] * 15)
    assert repeated_4gram_share(looped) > 0.9 and is_repetitive(looped)
    # "a b c d" twice: 5 four-grams, the last one repeats the first -> 1/5; no 4-gram thrice
    assert repeated_4gram_share("a b c d a b c d") == pytest.approx(1 / 5) and not is_repetitive("a b c d a b c d")
    assert is_repetitive("a b c d a b c d a b c d")


def test_keywords():
    groups = [["blood pressure"], ["heart", "cardiac"]]
    assert keyword_hit("High BLOOD PRESSURE strains the heart.", groups)
    assert keyword_hit("blood pressure; cardiac output", groups)
    assert not keyword_hit("High blood pressure.", groups)  # every group must be hit
    assert keyword_hit("Feverish children", [["fever"]]) and not keyword_hit("antifever", [["fever"]])
    assert keyword_groups({}, "r") is None and keyword_groups({"keywords": groups}) == groups
    with pytest.raises(ValueError, match=r"r1.*meta.keywords.*groups of alternatives"):
        keyword_groups({"keywords": ["flat", "list"]}, "r1")
