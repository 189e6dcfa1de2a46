"""Which teacher answers sequence-mode distillation keeps, and which caches the distill stage accepts."""
from __future__ import annotations

import pytest
import torch

from meddistill.data import MedicalRecord
from meddistill.jobs.distill_data import keep_teacher_answer, write_shard
from meddistill.prompts import extract_answer
from meddistill.spec.models import Distillation

MC = MedicalRecord("mc", "Which drug?", {"A": "Aspirin", "B": "Heparin"}, None, "B", "multiple_choice", "t")
YN = MedicalRecord("yn", "Does it work?", None, "A trial.", "yes", "yes_no_maybe", "t")
OPEN = MedicalRecord("op", "What is hypertension?", None, None,
                     "High blood pressure: the force of blood against artery walls is too high.", "open", "t")
MED = MedicalRecord("md", "How much paracetamol for an adult?", None, None, "500 mg to 1 g every 4 to 6 hours", "medication", "t")

GENERATIONS = [  # (record, teacher text, kept?)
    (MC, "Final answer: B", True),
    (MC, "Final answer: A", False),
    (MC, "<think>B looks right, the answer is B", False),  # truncated: never mined
    (YN, "Final answer: Yes", True),
    (YN, "Final answer: maybe", False),
    (OPEN, "Hypertension is high blood pressure in the artery walls.", True),
    (OPEN, "Final answer: It is a condition of the heart muscle and lungs.", False),  # F1 0.26: some overlap, under 0.3
    (OPEN, "I like turtles.", False),
    (MED, "Adults take 500 mg every 4 to 6 hours.", True),
    (MED, "", False),
]


def _select(threshold=0.3):
    return [keep_teacher_answer(record, extract_answer(text, record), threshold) for record, text, _ in GENERATIONS]


def test_closed_questions_need_the_label_open_ones_similarity():
    decisions = _select()
    assert [keep for keep, _ in decisions] == [kept for _, _, kept in GENERATIONS]
    assert [kind for _, kind in decisions] == ["closed"] * 5 + ["open"] * 5


def test_the_threshold_decides_for_open_questions_only():
    assert all(keep == (record.question_type in ("multiple_choice", "yes_no_maybe") and kept)
               for (keep, _), (record, _, kept) in zip(_select(threshold=1.0), GENERATIONS))
    loose = _select(threshold=0.0)  # any parsed open answer, still never an empty or wrong closed one
    assert [keep for keep, _ in loose] == [True, False, False, True, False, True, True, True, True, False]


def test_similarity_threshold_is_a_validated_spec_field():
    assert Distillation().similarity_threshold == 0.3
    assert Distillation.model_validate({"similarityThreshold": 0.6}).similarity_threshold == 0.6
    with pytest.raises(ValueError, match="similarityThreshold"):
        Distillation.model_validate({"similarityThreshold": 1.5})


def _cache(directory, dist: Distillation, key: str):
    from meddistill.artifacts import write_manifest

    directory.mkdir()
    example = {"id": "x", "input_ids": [1, 2, 3], "labels": [-100, 2, 3], key: torch.zeros(2, 3)}
    write_shard(directory / "shard-00000.safetensors", [example], key)
    write_manifest(directory, stage="distill-data", config={"distillation": dist.model_dump(by_alias=True)})
    return directory


def test_distill_refuses_a_cache_made_at_another_temperature_or_in_the_old_format(tmp_path):
    from meddistill.jobs.distill import check_cache_settings
    from meddistill.jobs.stage import StageError

    made = Distillation(temperature=2.0)
    cache = _cache(tmp_path / "new", made, "bucket_logprobs")
    check_cache_settings(cache, made)  # same settings: accepted
    with pytest.raises(StageError, match=r"temperature=2\.0.*now says 1\.0.*--stage distill-data --force"):
        check_cache_settings(cache, Distillation(temperature=1.0))
    with pytest.raises(StageError, match=r"topK=20.*now says 8"):
        check_cache_settings(cache, Distillation(top_k=8))
    old = _cache(tmp_path / "old", made, "topk_logprobs")  # written before the tail bucket existed
    with pytest.raises(StageError, match=r"predates the current format.*'bucket_logprobs'.*--force"):
        check_cache_settings(old, made)
