"""quantization.formats: which formats a job makes, which it refuses (naming the field), and which
serving engine each replica gets. Pure: no model, no Ray."""
from __future__ import annotations

import pytest

from meddistill.jobs.evaluate import evaluated_models
from meddistill.quantized_formats import FormatError, resolve_formats
from meddistill.serve import config
from meddistill.spec.models import MedDistillJob


def job(formats=None, gpus=0, engine="auto", models=None) -> MedDistillJob:
    spec = {
        "teacher": {"model": "builtin:smollm2-135m-instruct", "datasets": ["jsonl:t.jsonl"]},
        "student": {"model": "builtin:smollm2-135m-instruct"},
        "evaluation": {"datasets": ["jsonl:e.jsonl"]},
        "quantization": {"formats": formats, "ggufType": "Q8_0"},
        "serving": {"gpusPerReplica": gpus, "engine": engine},
    }
    if models:
        spec["evaluation"]["models"] = models
    return MedDistillJob.model_validate({"apiVersion": "meddistill.io/v1alpha1", "kind": "MedDistillJob",
                                         "metadata": {"name": "j"}, "spec": spec})


def test_unset_formats_default_to_nf4_on_both_hardware():
    assert resolve_formats(job().spec) == ["nf4"]
    assert resolve_formats(job(gpus=1).spec) == ["nf4"]


def test_explicit_formats_are_kept_in_order_without_repeats():
    assert resolve_formats(job(["gguf", "nf4", "gguf"]).spec) == ["gguf", "nf4"]


def test_a_format_not_built_yet_is_refused_naming_the_field(monkeypatch):
    from meddistill import quantized_formats

    monkeypatch.setattr(quantized_formats, "BUILT", ("nf4",))
    with pytest.raises(FormatError, match=r"spec\.quantization\.formats: gguf is not built"):
        resolve_formats(job(["nf4", "gguf"]).spec)


def test_gguf_alone_on_gpu_replicas_is_refused_with_the_reason():
    with pytest.raises(FormatError, match=r"llama\.cpp on CPU only.*serving\.gpusPerReplica"):
        resolve_formats(job(["gguf"], gpus=1).spec)
    assert resolve_formats(job(["gguf", "nf4"], gpus=1).spec) == ["gguf", "nf4"]  # nf4 serves there


@pytest.mark.parametrize("formats,gpu,llamacpp,expected", [
    (("nf4",), False, True, "transformers"),
    (("nf4", "gguf"), False, True, "llamacpp"),
    (("nf4", "gguf"), False, False, "transformers"),  # the image has no llama_cpp: nf4 still serves
    (("nf4", "gguf"), True, True, "transformers"),  # GPU without vllm: not llama.cpp's CPU build
])
def test_auto_picks_llamacpp_for_gguf_on_cpu(formats, gpu, llamacpp, expected):
    assert config.pick_engine("auto", gpu=gpu, vllm_installed=False, formats=formats,
                              llamacpp_installed=llamacpp) == expected


def test_gguf_alone_or_engine_llamacpp_where_llamacpp_cannot_run_is_refused_with_the_reason():
    why = "llama.cpp (/x/lib) died with SIGILL decoding a small test model; rebuild it"
    with pytest.raises(ValueError, match=r"gguf format is served by llama\.cpp, but llama\.cpp .* SIGILL.*add nf4"):
        config.pick_engine("auto", gpu=False, vllm_installed=False, formats=("gguf",), llamacpp_problem=why)
    with pytest.raises(ValueError, match=r"serving\.engine llamacpp: llama\.cpp .* SIGILL .* rebuild"):
        config.pick_engine("llamacpp", gpu=False, vllm_installed=False, formats=("nf4", "gguf"), llamacpp_problem=why)
    with pytest.raises(ValueError, match="serving.engine llamacpp: llama-cpp-python is not installed"):
        config.pick_engine("llamacpp", gpu=False, vllm_installed=False, formats=("gguf",))
    assert config.pick_engine("llamacpp", gpu=False, vllm_installed=False, formats=("gguf",),
                              llamacpp_installed=True) == "llamacpp"


def test_an_engine_without_its_format_is_refused():
    with pytest.raises(ValueError, match="serving.engine llamacpp .* quantization.formats"):
        config.pick_engine("llamacpp", gpu=False, vllm_installed=False, formats=("nf4",))
    with pytest.raises(ValueError, match="serving.engine transformers .* quantization.formats"):
        config.pick_engine("transformers", gpu=False, vllm_installed=False, formats=("gguf",))


def test_serve_args_carry_the_formats_and_where_the_gguf_is():
    args = config.app_args(job(["nf4", "gguf"], engine="llamacpp"), "/m")
    assert args["engine"] == "llamacpp" and args["formats"] == ["nf4", "gguf"]
    assert args["gguf_file"] == "gguf/model-Q8_0.gguf"
    assert "gguf_file" not in config.app_args(job(), "/m")


def test_evaluation_rows_follow_the_formats_made():
    assert evaluated_models(job().spec) == ["base", "teacher", "student", "quantized"]
    assert evaluated_models(job(["nf4", "gguf"]).spec)[-2:] == ["quantized", "gguf"]
    assert evaluated_models(job(["gguf"]).spec) == ["base", "teacher", "student", "gguf"]
    assert evaluated_models(job(["gguf"], models=["student"]).spec) == ["student"]


def test_build_app_gives_a_cpu_replica_of_a_gguf_job_the_llamacpp_engine():
    from meddistill.serve.app import build_app

    args = config.app_args(job(["nf4", "gguf"]), "/m")
    assert build_app(args)._bound_deployment.init_args[0].engine == "llamacpp"
    assert build_app(config.app_args(job(), "/m"))._bound_deployment.init_args[0].engine == "transformers"
