"""The w4a16 format's place in serving and evaluation: vLLM serves it from the artifact's w4a16/ folder
with the scheme auto-detected; a replica that cannot serve it is refused with the reason; the evaluate
stage gives it a row. Pure config (vLLM cannot run here): the model-source callback runs on a real
Ray Serve LLM LLMConfig, as tests/test_serve_vllm_auth.py does for nf4."""
from __future__ import annotations

import asyncio

import pytest

from meddistill import artifacts
from meddistill.jobs.evaluate import evaluated_models
from meddistill.quantized_formats import FormatError, resolve_formats
from meddistill.serve import config
from meddistill.serve.vllm_app import ResolveModelSource, vllm_llm_config
from tests.test_quantized_formats import job


def test_w4a16_is_built_and_served_on_gpu_only():
    assert resolve_formats(job(["w4a16"], gpus=1).spec) == ["w4a16"]
    assert resolve_formats(job(["nf4", "w4a16"]).spec) == ["nf4", "w4a16"]  # CPU replicas serve the nf4
    with pytest.raises(FormatError, match=r"w4a16 by vLLM on GPU only.*serving\.gpusPerReplica"):
        resolve_formats(job(["w4a16"]).spec)


@pytest.mark.parametrize("formats,vllm,expected", [
    (("w4a16",), True, "vllm"), (("nf4", "w4a16"), True, "vllm"),
    (("nf4", "w4a16"), False, "transformers"),  # no vllm in the image: the nf4 still serves
])
def test_auto_gives_w4a16_to_vllm_on_gpu(formats, vllm, expected):
    assert config.pick_engine("auto", gpu=True, vllm_installed=vllm, formats=formats) == expected


def test_a_replica_that_cannot_serve_w4a16_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"w4a16 is served by vLLM.*install vllm in spec\.image"):
        config.pick_engine("auto", gpu=True, vllm_installed=False, formats=("w4a16",))
    with pytest.raises(ValueError, match=r"serving\.engine vllm serves the w4a16 or nf4 format"):
        config.pick_engine("vllm", gpu=True, vllm_installed=True, formats=("gguf",))
    assert config.pick_engine("vllm", gpu=True, vllm_installed=True, formats=("w4a16",)) == "vllm"


def test_vllm_config_points_at_the_w4a16_folder_and_lets_vllm_detect_the_scheme():
    args = config.app_args(job(["nf4", "w4a16"], gpus=1), "s3://models/j/quantize")
    llm = vllm_llm_config(args)  # a valid Ray Serve LLM config, our callback in it
    assert llm.model_loading_config.model_source == "s3://models/j/quantize"  # the whole artifact: checked by its manifest
    assert llm.callback_config.callback_kwargs == {"subfolder": "w4a16"}
    assert llm.callback_config.callback_class is ResolveModelSource
    assert "quantization" not in llm.engine_kwargs  # compressed-tensors, from the folder's config.json
    nf4 = config.app_args(job(["nf4"], gpus=1), "/m")["llm_config"]
    assert nf4["engine_kwargs"]["quantization"] == "bitsandbytes" and "callback_config" not in nf4


def test_llm_replicas_load_the_verified_artifacts_w4a16_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.PVC_ROOT_ENV, str(tmp_path))
    stage = tmp_path / "models" / "j" / "quantize"
    (stage / "w4a16").mkdir(parents=True)
    (stage / "w4a16" / "config.json").write_text('{"quantization_config": {"quant_method": "compressed-tensors"}}')
    artifacts.write_manifest(stage, stage="quantize", config={})
    args = config.app_args(job(["w4a16"], gpus=1), "pvc://models/j/quantize")

    llm = vllm_llm_config(args)
    asyncio.run(ResolveModelSource(llm, **llm.callback_config.callback_kwargs).run_callback("on_before_node_init"))
    assert llm.model_loading_config.model_source == str(stage / "w4a16")

    (stage / "w4a16" / "config.json").write_text("{}")  # changed after publishing: refused like the nf4 folder
    llm = vllm_llm_config(args)
    with pytest.raises(Exception, match="does not match the sha256"):
        asyncio.run(ResolveModelSource(llm, **llm.callback_config.callback_kwargs).run_callback("on_before_node_init"))


def test_an_artifact_without_the_w4a16_folder_names_the_format(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    llm = vllm_llm_config(config.app_args(job(["w4a16"], gpus=1), str(tmp_path)))
    with pytest.raises(Exception, match=r"no w4a16/config.json.*quantization\.formats"):  # Ray wraps ModelArtifactError
        asyncio.run(ResolveModelSource(llm, **llm.callback_config.callback_kwargs).run_callback("on_before_node_init"))


def test_evaluation_gives_w4a16_its_own_row():
    assert evaluated_models(job(["nf4", "w4a16"]).spec)[-2:] == ["quantized", "w4a16"]
    assert evaluated_models(job(["nf4", "gguf", "w4a16"]).spec)[-3:] == ["quantized", "gguf", "w4a16"]
    assert "w4a16" not in evaluated_models(job(["nf4", "w4a16"], models=["student"]).spec)
