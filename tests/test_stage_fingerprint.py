"""A finished stage is reused only while its fingerprint (its spec sections + its inputs' digests)
still matches: a changed setting re-runs that stage and, through the new digest, every later one.

No training: each "run" writes a small file and the manifest exactly as run_stage does.
"""
from __future__ import annotations

import json

import pytest

from meddistill.artifacts import write_manifest
from meddistill.jobs.stage import DEPENDS_ON, StageContext, check_existing, input_digests, spec_fingerprint
from meddistill.spec.models import STAGES, MedDistillJob, pipeline_stages
from tests.pipeline_fixture import tiny_job_document

REFS = {"train": "jsonl:train.jsonl", "eval": "jsonl:eval.jsonl"}


def make_ctx(tmp_path, **overrides) -> StageContext:
    doc = tiny_job_document("/models/tiny", REFS, str(tmp_path / "runs"), "fp", **overrides)
    return StageContext(MedDistillJob.model_validate(doc))


def finish(ctx: StageContext, stage: str) -> None:
    """What run_stage records, without the recipe."""
    out = ctx.output_dir(stage)
    inputs = input_digests(ctx, stage)
    (out / "weights.bin").write_bytes(json.dumps(ctx.spec.model_dump(mode="json")).encode())
    write_manifest(out, stage=stage, config={}, fingerprint=spec_fingerprint(ctx, stage), inputs=inputs)


def rerun(ctx: StageContext) -> dict[str, str]:
    """Walk the pipeline as `meddistill run` does: {stage: why it ran} for the stages that ran."""
    ran = {}
    for stage in pipeline_stages(ctx.spec):
        done, why = check_existing(ctx, stage)
        if done is None:
            finish(ctx, stage)
            ran[stage] = why
    return ran


@pytest.fixture
def built(tmp_path):
    ctx = make_ctx(tmp_path)
    assert list(rerun(ctx)) == pipeline_stages(ctx.spec)  # a first run makes everything
    assert rerun(ctx) == {}  # and a second reuses everything
    return tmp_path


CHANGES = [  # (override, the first stage that must re-run, the section it names)
    ({"distillation": {"temperature": 4.0}}, "distill-data", "spec.distillation.temperature"),
    ({"distillation": {"topK": 16}}, "distill-data", "spec.distillation.topK"),
    ({"distillation": {"alpha": 0.9}}, "distill", "spec.distillation"),  # the loss weight: the cache stays valid
    ({"evaluation": {"datasets": ["jsonl:other.jsonl"]}}, "teacher", "spec.evaluation.datasets"),  # decontamination
    ({"teacher": {"datasets": ["jsonl:more.jsonl"]}}, "teacher", "spec.teacher"),
    ({"teacher": {"training": {"learningRate": 5e-4}}}, "teacher", "spec.teacher"),
    ({"student": {"lora": {"r": 8}}}, "distill", "spec.student"),
    ({"student": {"training": {"maxSamples": 10}}}, "distill-data", "spec.student.training.maxSamples"),
    ({"quantization": {"method": "int8"}}, "quantize", "spec.quantization"),
    ({"evaluation": {"limit": 3}}, "evaluate", "spec.evaluation"),
]


@pytest.mark.parametrize("override,first,section", CHANGES, ids=[json.dumps(c[0]) for c in CHANGES])
def test_a_changed_setting_reruns_its_stage_and_every_later_one(built, override, first, section):
    ctx = make_ctx(built, **override)
    stages = pipeline_stages(ctx.spec)
    ran = rerun(ctx)
    assert list(ran) == stages[stages.index(first):]
    assert ran[first] == f"{section} changed since the artifact was made"
    before = make_ctx(built)
    for later in stages[stages.index(first) + 1:]:
        # a later stage names its own changed section (distill reads spec.distillation too), else its changed input
        own_changed = spec_fingerprint(before, later) != spec_fingerprint(ctx, later)
        assert ran[later].startswith("spec." if own_changed else "input "), (later, ran[later])
    assert rerun(ctx) == {}  # the new artifacts are up to date
    assert list(rerun(make_ctx(built))) == stages[stages.index(first):]  # and changing it back re-runs again


def test_settings_no_stage_reads_reuse_everything(built):
    assert rerun(make_ctx(built, serving={"maxReplicas": 5}, runPolicy={"backoffLimit": 0})) == {}


def test_a_rebuilt_upstream_artifact_cascades_even_with_the_same_spec(built):
    ctx = make_ctx(built)
    finish(ctx, "distill")  # e.g. `meddistill run --stage distill --force`: new manifest, new digest
    assert rerun(ctx) == {"quantize": "input distill changed since the artifact was made",
                          "evaluate": "input distill, quantize changed since the artifact was made"}


def test_manifests_without_a_fingerprint_are_stale(built):
    ctx = make_ctx(built)
    out = ctx.output_dir("quantize")
    write_manifest(out, stage="quantize", config={})  # as written before fingerprints existed
    done, why = check_existing(ctx, "quantize")
    assert done is None and why == "its artifact predates stage fingerprints"


def test_a_damaged_artifact_is_rerun(built):
    ctx = make_ctx(built)
    (ctx.output_dir("teacher") / "weights.bin").write_bytes(b"truncated")
    assert check_existing(ctx, "teacher") == (None, "its artifact is incomplete or its files changed")


def test_online_teacher_jobs_have_no_distill_data_input(built):
    ctx = make_ctx(built, distillation={"teacherCache": "online"})
    assert "distill-data" not in pipeline_stages(ctx.spec)
    assert set(input_digests(ctx, "distill")) == {"teacher"}
    # teacherCache is part of spec.distillation, so the distill stage re-runs for the new mode
    assert list(rerun(ctx)) == ["distill", "quantize", "evaluate"]


def test_the_dependency_table_names_real_spec_fields_and_earlier_stages(tmp_path):
    ctx = make_ctx(tmp_path)
    for stage, (sections, inputs) in DEPENDS_ON.items():
        assert len(spec_fingerprint(ctx, stage)) == len(sections)  # raises KeyError on a typo
        assert all(STAGES.index(i) < STAGES.index(stage) for i in inputs)
    assert set(DEPENDS_ON) == set(STAGES)


def test_the_teacher_cache_depends_on_every_distillation_field_but_the_loss_weight():
    """A new field of spec.distillation must be named here or it could change the cache unseen;
    alpha only weighs CE against KD, so a no-teacher ablation (alpha 0) reuses the job's cache."""
    from meddistill.spec.models import Distillation

    named = {path.split(".", 1)[1] for path in DEPENDS_ON["distill-data"][0] if path.startswith("distillation.")}
    fields = {info.alias or name for name, info in Distillation.model_fields.items()}
    assert named == fields - {"alpha"}
