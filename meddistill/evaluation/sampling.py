"""Seeded, label-stratified subsets of a dataset: what `--limit N` / `evaluation.limit` evaluate.

Taking the first N records biases the label mix (PubMedQA's test file, for one, is not shuffled),
so a limit draws a sample that keeps each gold label's share: proportional allocation with the
largest-remainder rule, a seeded draw inside each stratum, and the records returned in their
original order. The same records and seed always give the same sample, so two models evaluated
with the same limit see the same questions (which the paired tests rely on).
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

from meddistill.data.records import MedicalRecord

R = TypeVar("R", bound=MedicalRecord)


def stratum_of(record: MedicalRecord) -> str | None:
    """The stratum key: the gold label of a closed question, None for everything else.

    Open questions carry free text as their answer (every one would be its own stratum), so they
    pool with the unlabelled records.
    """
    return record.answer if record.is_scored_by_choice else None


def sample_records(records: Sequence[R], limit: int | None, seed: int = 0) -> list[R]:
    """`limit` records stratified by gold label (see the module docstring); all when limit is None or >= len."""
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 (or None for all records)")
    strata: dict[str | None, list[int]] = {}
    for i, record in enumerate(records):
        strata.setdefault(stratum_of(record), []).append(i)
    total = len(records)
    quotas = {key: limit * len(idx) // total for key, idx in strata.items()}
    # Largest remainder: the seats left after flooring go to the largest fractional parts; ties
    # are broken by a seeded shuffle so no label is always favoured.
    rng = random.Random(seed)
    keys = list(strata)
    rng.shuffle(keys)
    keys.sort(key=lambda k: -(limit * len(strata[k]) % total))
    for key in keys[: limit - sum(quotas.values())]:
        quotas[key] += 1
    chosen: list[int] = []
    for key in sorted(strata, key=lambda k: (k is None, str(k))):  # fixed draw order: same seed, same sample
        chosen += rng.sample(strata[key], quotas[key])
    return [records[i] for i in sorted(chosen)]
