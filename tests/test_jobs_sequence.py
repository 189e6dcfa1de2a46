"""Sequence-level distillation (distillation.mode: sequence): the teacher answers the training
prompts, only its correct answers are kept (closed questions: the label; open ones: similar
enough to the reference, tests/test_distill_selection.py), and the student learns them with
plain cross-entropy.

The positive path needs a teacher that answers some questions right, so it uses the real
SmolLM2-135M-Instruct (one tiny-learning-rate teacher step keeps its answers as they are); the
refusal path uses the random tiny model, which never does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from meddistill.jobs.stage import StageContext, run_stage

pytestmark = pytest.mark.usefixtures("ray_local")

ONE_STEP = {"maxSteps": 1, "batchSize": 4, "maxSeqLength": 256, "maxSamples": 16, "checkpointEverySteps": 1}


def _records(ref: str) -> dict[str, dict]:
    path = ref.split(":", 1)[1]
    return {r["id"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def test_sequence_mode_keeps_only_correct_teacher_answers_and_trains_on_them(tiny_data_refs, tmp_path):
    from meddistill.spec.models import MedDistillJob
    from tests.pipeline_fixture import tiny_job_document

    doc = tiny_job_document(
        "builtin:smollm2-135m-instruct", tiny_data_refs, str(tmp_path / "runs"), name="seqkd",
        teacher={"training": {**ONE_STEP, "learningRate": 1e-7}},
        student={"derive": {"keepLayers": 4}, "training": ONE_STEP},
        distillation={"mode": "sequence", "maxNewTokens": 12},
    )
    ctx = StageContext(MedDistillJob.model_validate(doc))
    run_stage(ctx, "teacher")
    data = run_stage(ctx, "distill-data")

    m = data.metrics
    assert m["mode"] == "sequence" and m["examples"] > 0 and m["rejected"] > 0, m
    assert m["examples"] + m["rejected"] == ONE_STEP["maxSamples"]
    # the tiny set is all closed questions (labels): kept/rejected are counted per kind
    assert (m["kept_closed"], m["rejected_closed"], m["kept_open"], m["rejected_open"]) == (m["examples"], m["rejected"], 0, 0)
    labels = _records(tiny_data_refs["train"])
    kept = [json.loads(line) for p in sorted(Path(data.artifact_uri).glob("generated-*.jsonl"))
            for line in p.read_text().splitlines()]
    assert len(kept) == m["examples"]
    for row in kept:  # only the teacher's correct answers, with the text it generated
        assert row["answer"].lower() == labels[row["id"]]["answer"].lower(), row
        assert row["meta"]["teacher_text"].strip()

    distill = run_stage(ctx, "distill")
    d = distill.metrics
    assert d["train_examples"] == m["examples"]  # trained on exactly what was kept
    assert d["step"] == 1 and d["ce"] > 0 and d["kd"] == 0 and d["loss"] == pytest.approx(d["ce"])


def test_sequence_mode_refuses_when_the_teacher_gets_nothing_right(tiny_job):
    job = tiny_job("seqkd-none", distillation={"mode": "sequence", "maxNewTokens": 4},
                   teacher={"training": {"maxSteps": 1}})
    ctx = StageContext(job)
    run_stage(ctx, "teacher")
    with pytest.raises(Exception, match=r"no usable examples.*maxNewTokens"):
        run_stage(ctx, "distill-data")
