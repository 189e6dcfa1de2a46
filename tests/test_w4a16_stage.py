"""quantization.formats [nf4, w4a16] through the real quantize stage (Ray, PEFT merge, GPTQ on the tiny
training data, compressed-tensors) -> manifest -> the evaluate stage's w4a16 row loading and answering."""
from __future__ import annotations

import json

import pytest

from meddistill.artifacts import verify
from meddistill.jobs.stage import StageContext, run_stage


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tiny_data_refs, tmp_path_factory, ray_local):
    from meddistill.spec.models import MedDistillJob
    from tests.pipeline_fixture import tiny_job_document, write_distill_artifact

    doc = tiny_job_document(str(tiny_model_dir), tiny_data_refs, str(tmp_path_factory.mktemp("runs")),
                            quantization={"formats": ["nf4", "w4a16"]})
    ctx = StageContext(MedDistillJob.model_validate(doc))
    write_distill_artifact(ctx, tiny_model_dir, ["v_proj", "down_proj"])
    result = run_stage(ctx, "quantize")
    return ctx, ctx.output_dir("quantize"), result


def test_quantize_makes_w4a16_beside_nf4_listed_in_its_manifest(quantized):
    _, folder, result = quantized
    manifest = verify(folder)
    assert manifest is not None
    assert {"model.safetensors", "w4a16/model.safetensors", "w4a16/config.json", "w4a16/tokenizer.json"} <= set(manifest.files)
    m = result.metrics
    assert m["formats"] == ["nf4", "w4a16"] and m["w4a16_method"] == "gptq"
    # the tiny model is 64 wide: only its down_proj layers fit vLLM's kernel; 32 of the 40 training records calibrate them
    assert m["w4a16_quantized_modules"] == 2 and m["w4a16_calibration_records"] == 32
    config = json.loads((folder / "w4a16" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" in config["ignore"] and "lm_head" in config["ignore"]


def test_the_w4a16_row_loads_it_decompressed_and_answers(quantized, tiny_data_refs, tmp_path):
    from meddistill.data import load_dataset
    from meddistill.jobs.evaluate import evaluate_model

    _, folder, _ = quantized
    records = load_dataset(tiny_data_refs["eval"]).records[:4]
    settings = {"batch_size": 4, "max_new_tokens": 4, "prompt_style": "plain", "quantization": "nf4",
                "scoring": ["generative", "loglik"], "gpus": 0, "latency_questions": 2}
    rows = evaluate_model("w4a16", str(folder / "w4a16"), {tiny_data_refs["eval"]: records}, settings, str(tmp_path))
    assert [r["n"] for r in rows] == [4, 4]
    assert [r["latency_questions"] for r in rows] == [2, 0]  # evaluation.latencyQuestions; loglik has no batch-1 pass
    assert rows[0]["dtype"].startswith("w4a16 (decompressed on CPU, ")
    assert (tmp_path / "w4a16").is_dir()  # its detail reports
