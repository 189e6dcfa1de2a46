"""Weight bytes of a bitsandbytes NF4 model count its quantization state, as the saved file does."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    source = tmp_path_factory.mktemp("fp32")
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(source)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
    return LlamaForCausalLM.from_pretrained(source, quantization_config=quant)


def test_nf4_weight_bytes_match_the_tensors_it_saves(nf4_model, tmp_path):
    from safetensors import safe_open

    from meddistill.modelsource import model_weight_bytes

    nf4_model.save_pretrained(tmp_path)
    saved, state = 0, 0
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if key.endswith("bitsandbytes__nf4"):  # the state's JSON metadata, not memory the model holds
                continue
            t = f.get_tensor(key)
            saved += t.numel() * t.element_size()
            state += t.numel() * t.element_size() if key.rsplit(".", 1)[-1] in ("absmax", "nested_absmax") else 0
    packed_only = sum(p.numel() * p.element_size() for p in nf4_model.parameters())
    packed_4bit = sum(p.numel() for p in nf4_model.parameters() if hasattr(p, "quant_state"))
    assert state > 0.025 * packed_4bit  # absmax: one byte per 64 weights -> ~3 % of the packed 4-bit bytes
    counted = model_weight_bytes(nf4_model)
    assert counted >= packed_only + state
    # What differs is tiny: the rotary buffers (in memory, not saved) and each layer's offset (in
    # the file's JSON). Leaving out the state would be ~1.3 % here.
    assert counted == pytest.approx(saved, rel=1e-3)
