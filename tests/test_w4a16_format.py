"""The w4a16 format on a tiny random Llama whose widths fit vLLM's Marlin kernel (128): GPTQ against
round-to-nearest, compressed-tensors' packing as vLLM reads it, the quantization_config field by field
against vLLM's CompressedTensorsConfig parsing, and transformers loading it on CPU with the same
greedy answers as its dequantized reference."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from meddistill.jobs import quantize_w4a16 as w4a16

PROMPTS = [f"Question: {q}? Answer:" for q in (
    "Is metformin first-line for type 2 diabetes", "Which drug reverses opioid overdose", "What causes scurvy",
    "Is aspirin given in acute coronary syndrome", "Which organ produces insulin", "What is the antidote to warfarin",
    "Does smoking raise the risk of lung cancer", "Which electrolyte causes peaked T waves", "What treats anaphylaxis",
    "Is amoxicillin used for otitis media", "What does a high TSH suggest", "Which vaccine prevents cervical cancer",
    "What is the normal adult heart rate", "Which vitamin deficiency causes rickets", "Is ibuprofen safe in late pregnancy",
    "What is the first sign of sepsis", "Which antibiotic class causes tendon rupture", "What lowers LDL cholesterol",
    "Does exercise improve insulin sensitivity", "What is the treatment of diabetic ketoacidosis")]


def write_model(target: Path, hidden: int, intermediate: int, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from meddistill.modelsource import load_tokenizer

    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def load(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@pytest.fixture(scope="module")
def marlin_sized(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("w4a16") / "llama-128", hidden=128, intermediate=256)


@pytest.fixture(scope="module")
def compressed(marlin_sized, tmp_path_factory):
    """(w4a16 folder, the dequantized reference: the same fake-quantized weights in a plain model, {name: scales})."""
    from meddistill.modelsource import load_tokenizer

    tokenizer = load_tokenizer(marlin_sized)
    model = load(marlin_sized)
    names, keep = w4a16.plan_modules(model, ["lm_head"])
    samples = [tokenizer(p)["input_ids"] for p in PROMPTS[:8]]
    scales = w4a16.quantize_weights(model, names, samples, torch.bfloat16)
    model.to(torch.bfloat16)
    reference = copy.deepcopy(model)
    out = tmp_path_factory.mktemp("w4a16") / "out"
    w4a16.save_compressed(model, scales, sorted(keep), out)
    tokenizer.save_pretrained(out)
    return out, reference, scales


def test_layers_vllm_cannot_run_in_4_bits_stay_16_bit_with_their_fused_siblings(tiny_model_dir, marlin_sized):
    names, keep = w4a16.plan_modules(load(marlin_sized), ["lm_head", "model.layers.0.self_attn.v_proj"])
    assert keep["lm_head"] == "quantization.skipModules"
    # v_proj is fused with q_proj and k_proj in vLLM (qkv_proj): one scheme for all three
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"} <= set(keep)
    assert "model.layers.0.self_attn.o_proj" in names and "model.layers.1.self_attn.v_proj" in names
    # the shared tiny model is 64 wide: only down_proj (input 128) fits Marlin's 128-column tiles
    names, keep = w4a16.plan_modules(load(tiny_model_dir), ["lm_head"])
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "input width % 128" in keep["model.layers.0.self_attn.q_proj"]


def test_scales_follow_compressed_tensors_rule():
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = torch.randn(8, 256)
    weight[3, :128] = 0  # an all-zero group gets a tiny scale, not a division by zero
    groups = weight.reshape(8, 2, 128)
    theirs, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), w4a16.scheme().weights)
    torch.testing.assert_close(w4a16.group_scales(weight, torch.float32), theirs, rtol=0, atol=0)


def test_gptq_moves_a_layers_output_less_than_round_to_nearest():
    """On correlated inputs (as activations are), GPTQ's error feedback beats plain rounding on X W^T."""
    torch.manual_seed(0)
    x = torch.randn(2048, 32) @ torch.randn(32, 256)  # rank-32 inputs
    weight = torch.randn(64, 256)
    gptq, gptq_scales = w4a16.gptq(weight, x.T @ x, torch.bfloat16)
    rtn, _ = w4a16.rtn(weight, torch.bfloat16)
    error = {name: (x @ (weight - q).T).norm() / (x @ weight.T).norm() for name, q in (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.5 * error["rtn"], error
    # every value is a 4-bit integer times its group scale (the product rounded to bf16, as the loaders compute it)
    ints = gptq / gptq_scales.repeat_interleave(128, dim=1)
    assert torch.allclose(ints, ints.round(), atol=8 * 2 ** -8) and ints.round().min() >= -8 and ints.round().max() <= 7


def test_weights_are_packed_as_vllm_reads_them(compressed):
    """weight_packed: int32, 8 values a word, value i of a word at bits 4i, stored + 8 (vLLM's uint4b8);
    weight_scale: [out, in / 128] in the activations' dtype; weight_shape: [out, in]."""
    from safetensors.torch import load_file

    out, reference, scales = compressed
    tensors = load_file(out / "model.safetensors")
    ref = reference.state_dict()
    for name in scales:
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        rows, cols = ref[f"{name}.weight"].shape
        assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8)
        assert scale.dtype == torch.bfloat16 and scale.shape == (rows, cols // 128)
        assert tensors[f"{name}.weight_shape"].tolist() == [rows, cols]
        ints = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(rows, cols) - 8
        dequantized = ints.to(torch.bfloat16) * scale.repeat_interleave(128, dim=1)
        assert torch.equal(dequantized, ref[f"{name}.weight"]), name
        assert f"{name}.weight" not in tensors
    assert "lm_head.weight" not in tensors  # tied to the embeddings, kept 16-bit


def test_quantization_config_is_what_vllm_parses(compressed):
    """Field by field what vLLM's CompressedTensorsConfig.from_config and _get_scheme_from_parts read to pick
    CompressedTensorsWNA16 (Marlin): quant_method, format pack-quantized, one config group targeting Linear
    with int4 symmetric static group-128 weights and no input activations; lm_head ignored."""
    from compressed_tensors.quantization import QuantizationArgs

    out, _, _ = compressed
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"  # vLLM's get_quantization_config dispatch key
    assert q["format"] == "pack-quantized"
    assert q["ignore"] == ["lm_head"]
    assert q["sparsity_config"] in ({}, None) and q.get("kv_cache_scheme") is None
    [group] = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and group.get("input_activations") is None
    assert group.get("format") in (None, "pack-quantized")
    weights = QuantizationArgs.model_validate(group["weights"])  # what vLLM does with it
    assert (weights.num_bits, weights.type, weights.symmetric, weights.strategy, weights.group_size) == (
        4, "int", True, "group", 128)
    assert not weights.dynamic and weights.actorder is None  # no weight_g_idx to load
    assert config["dtype"] == "bfloat16"  # vLLM's dtype auto: Marlin runs fp16 or bf16, never fp32


def test_transformers_loads_it_on_cpu_and_answers_as_its_dequantized_reference(compressed):
    from transformers import CompressedTensorsConfig

    from meddistill.modelsource import load_tokenizer

    out, reference, _ = compressed
    loaded = load(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    reference = reference.to(torch.float32)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokenizer = load_tokenizer(out)
    assert greedy(loaded, tokenizer, PROMPTS) == greedy(reference, tokenizer, PROMPTS)


def greedy(model, tokenizer, prompts: list[str], new_tokens: int = 8) -> list[list[int]]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()
