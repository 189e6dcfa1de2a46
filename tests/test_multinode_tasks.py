"""Every stage of a job on a Ray cluster whose workers cannot see the driver's disk, with s3://
artifacts: distill-data's teacher shards and evaluate's models run as plain Ray tasks on the
worker nodes (the head has no CPUs), read their inputs from the bucket into their own node's cache
and write there; the driver must still publish complete artifacts (the multinode fixture of
test_multinode_s3: moto S3, a driver-only cache, one cache per worker node).

The student is pruned from the teacher on the driver: its base reaches the training workers, and
evaluate's student task, through the bucket (the adapter names it `../base`), never as a driver
path; so does the online teacher (teacherCache: online)."""
from __future__ import annotations

import json

import pytest

from tests.test_artifacts_s3 import s3_endpoint  # noqa: F401 - the moto server fixture
from tests.test_multinode_s3 import keys, multinode  # noqa: F401 - the 3-node cluster fixture

pytestmark = pytest.mark.own_ray  # a 3-node Ray cluster of its own (ray.cluster_utils)


@pytest.mark.slow
def test_every_stage_publishes_when_its_ray_tasks_run_on_other_nodes(
        multinode, tiny_model_dir, tiny_data_refs, tmp_path, monkeypatch):  # noqa: F811
    from meddistill.artifacts import ArtifactStore, verify
    from meddistill.jobs.stage import StageContext, run_stage
    from meddistill.modelsource import load_model
    from meddistill.spec.models import MedDistillJob, pipeline_stages
    from tests.pipeline_fixture import tiny_job_document

    bucket, driver_cache, node_caches = multinode
    doc = tiny_job_document(
        str(tiny_model_dir), tiny_data_refs, f"s3://{bucket}/runs", name="mt",
        # two teacher workers: two distill-data shards, two tasks at once
        teacher={"resources": {"workers": 2}, "training": {"maxSteps": 2}},
        student={"training": {"maxSteps": 2}},  # derive: keepLayers 1, pruned on the driver
        distillation={"teacherCache": "cached"},
    )
    ctx = StageContext(MedDistillJob.model_validate(doc))
    assert ctx.spec.student.model is None and ctx.spec.student.derive is not None
    assert pipeline_stages(ctx.spec) == ["teacher", "distill-data", "distill", "quantize", "evaluate"]
    results = {stage: run_stage(ctx, stage) for stage in pipeline_stages(ctx.spec)}

    # another machine, its cache empty, fetches every stage and each verifies with its digest
    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "cache-elsewhere"))
    fetched = {}
    for stage, result in results.items():
        fetched[stage] = ArtifactStore(result.artifact_uri).fetch()
        assert fetched[stage] is not None, f"{stage}: no manifest in the bucket"
        assert verify(fetched[stage]).digest == result.digest, stage

    shards = sorted(p.name for p in fetched["distill-data"].glob("shard-*.safetensors"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert results["distill-data"].metrics["examples"] > 0

    # the adapter names its base inside the artifact, so it loads from this machine's copy
    distill = fetched["distill"]
    assert json.loads((distill / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "../base"
    assert json.loads((distill / "base" / "config.json").read_text())["num_hidden_layers"] == 1
    student, _ = load_model(str(distill / "adapter"))
    assert student.base_model.model.config.num_hidden_layers == 1

    evaluate = fetched["evaluate"]
    table = json.loads((evaluate / "results.json").read_text())
    models = ctx.spec.evaluation.models
    assert sorted({row["model"] for row in table["rows"]}) == sorted(models)
    for kind in models:  # each model's per-question report, written on a worker node
        assert list((evaluate / kind).glob("*/eval.json")), kind
    assert (evaluate / "eval.md").read_text().strip()  # the driver joined the reports the tasks wrote

    # the tasks' node-local folders are gone once uploaded
    assert not [p for cache in node_caches for p in cache.rglob(".task-*")]

    # teacherCache: online, same teacher artifact: the workers fetch the teacher themselves; the
    # pruned base (same teacher, same settings) is reused, not pruned again
    monkeypatch.setenv("MEDDISTILL_CACHE", str(driver_cache))
    doc["spec"]["distillation"]["teacherCache"] = "online"
    online_ctx = StageContext(MedDistillJob.model_validate(doc))
    base_manifest = (driver_cache / "s3" / bucket / "runs/mt/distill/base/manifest.json").read_bytes()
    online = run_stage(online_ctx, "distill")
    assert online.metrics["step"] == 2 and online.metrics["kd"] > 0
    assert (driver_cache / "s3" / bucket / "runs/mt/distill/base/manifest.json").read_bytes() == base_manifest
    assert "runs/mt/distill/base/config.json" in keys(bucket, "runs/mt/distill/base/")
    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "cache-third"))
    again = ArtifactStore(online.artifact_uri).fetch()
    assert verify(again).digest == online.digest
    load_model(str(again / "adapter"))
