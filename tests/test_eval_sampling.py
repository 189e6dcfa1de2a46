"""Seeded label-stratified sampling for evaluation limits."""
from collections import Counter

import pytest

from meddistill.data import MedicalRecord, load_dataset
from meddistill.evaluation import sample_records


def _pubmedqa_test():
    return load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test").records


@pytest.mark.parametrize("limit", [1, 7, 40, 123, 499])
def test_label_proportions_kept_within_one_per_stratum(limit):
    records = _pubmedqa_test()
    full = Counter(r.answer for r in records)
    sample = sample_records(records, limit, seed=3)
    got = Counter(r.answer for r in sample)
    assert len(sample) == limit and len({r.id for r in sample}) == limit
    for label, count in full.items():
        assert abs(got[label] - limit * count / len(records)) < 1, (label, got, full)


def test_same_seed_same_sample_in_input_order_and_seeds_differ():
    records = _pubmedqa_test()
    position = {r.id: i for i, r in enumerate(records)}
    first = [r.id for r in sample_records(records, 40, seed=0)]
    assert first == [r.id for r in sample_records(records, 40, seed=0)]
    assert [position[i] for i in first] == sorted(position[i] for i in first)  # order-stable
    assert first != [r.id for r in sample_records(records, 40, seed=1)]
    assert first != [r.id for r in records[:40]]  # not the first N


def test_unlabelled_and_open_records_form_their_own_stratum():
    closed = [MedicalRecord(f"c{i}", "q?", None, None, "yes" if i % 2 else "no", "yes_no_maybe", "t") for i in range(6)]
    other = [MedicalRecord(f"o{i}", "q?", None, None, None if i % 2 else "free text", "open", "t") for i in range(4)]
    sample = sample_records(closed + other, 5, seed=0)
    kinds = Counter(r.answer if r.question_type == "yes_no_maybe" else "other" for r in sample)
    assert sum(kinds.values()) == 5 and kinds["other"] == 2  # 5 * 4/10
    assert {kinds["yes"], kinds["no"]} == {1, 2}  # 1.5 each: one of them gets the remainder seat


def test_no_limit_or_large_limit_returns_everything_and_negative_fails():
    records = _pubmedqa_test()[:10]
    assert sample_records(records, None) == records and sample_records(records, 50) == records
    assert sample_records(records, 0) == []
    with pytest.raises(ValueError, match="limit=-1"):
        sample_records(records, -1)
