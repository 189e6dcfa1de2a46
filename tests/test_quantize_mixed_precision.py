"""mixedPrecision: sensitive keeps llama.cpp Q4_K_M's more-bits projections (v_proj, down_proj) 16-bit,
every v_proj under grouped-query attention, and quantizes the rest to 4 bits."""
from __future__ import annotations

import pytest

from meddistill.jobs.quantize import bnb_config, sensitive_modules, use_more_bits
from meddistill.spec.models import Quantization


def test_use_more_bits_matches_llama_cpp_for_28_layers():
    # llama-quant.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, integer division
    assert [i for i in range(28) if use_more_bits(i, 28)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]


def test_sensitive_modules_are_v_and_down_projections_of_those_layers():
    names = [f"model.layers.{i}.{m}" for i in range(16)
             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]
    kept = sensitive_modules(names + ["lm_head", "model.embed_tokens"], 16)
    layers = [0, 1, 4, 7, 10, 13, 14, 15]
    assert kept == [f"model.layers.{i}.{m}" for i in layers for m in ("self_attn.v_proj", "mlp.down_proj")]
    every_v = sensitive_modules(names, 16, every_v_proj=True)
    assert set(every_v) == set(kept) | {f"model.layers.{i}.self_attn.v_proj" for i in range(16)}


@pytest.mark.parametrize("kv_heads, every_v", [(2, True), (4, False)])
def test_sensitive_model_keeps_exactly_those_modules_unquantized(tmp_path, kv_heads, every_v):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=kv_heads)
    merged = LlamaForCausalLM(config)
    merged.save_pretrained(tmp_path)
    spec = Quantization.model_validate({"method": "nf4", "computeDtype": "float32", "mixedPrecision": "sensitive"})
    quantized = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config(spec, merged))
    plain = {n for n, m in quantized.named_modules() if type(m) is torch.nn.Linear}
    expected = {f"model.layers.{i}.{p}" for i in (0, 3, 6, 7) for p in ("self_attn.v_proj", "mlp.down_proj")}
    if every_v:  # grouped-query attention: every (small) v_proj
        expected |= {f"model.layers.{i}.self_attn.v_proj" for i in range(8)}
    assert plain == expected | {"lm_head"}
    default = Quantization.model_validate({"method": "nf4", "computeDtype": "float32"})
    assert bnb_config(default, merged).llm_int8_skip_modules == ["lm_head"]
