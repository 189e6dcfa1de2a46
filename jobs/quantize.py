"""Recipe: merge the student's LoRA into its base, then quantize the weights with bitsandbytes.

    load base + adapter -> merge_and_unload -> save merged (temp) -> from_pretrained with
    BitsAndBytesConfig (nf4 | fp4 | int8; `none` keeps the merged weights) -> save_pretrained

On the GPU the stage reserves (jobs/devices.py), in its 16-bit dtype; on CPU in fp32.

The artifact directory itself is the quantized model (config.json, safetensors with the packed
4-bit weights and their quantization state, tokenizer): `from_pretrained(<dir>)` reloads it
quantized, which is what the serving app does. Weight bytes before and after are measured with
modelsource.model_weight_bytes on the loaded models (packed uint8 storage counts as it is).
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path

from meddistill.jobs.stage import StageContext, StageOutput

log = logging.getLogger(__name__)
# The projections llama.cpp's Q4_K_M gives more bits (attn_v, ffn_down): also the two most
# quantization-sensitive kinds we measured on the quickstart student (docs/results.md §3).
SENSITIVE_PROJECTIONS = (".self_attn.v_proj", ".mlp.down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice (llama-quant.cpp): the first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def sensitive_modules(module_names: list[str], n_layers: int, every_v_proj: bool = False) -> list[str]:
    """Full names of the v_proj / down_proj modules in the layers use_more_bits picks (every v_proj
    too when `every_v_proj`)."""
    keep = []
    for name in module_names:
        match = _LAYER.search(name)
        if not (match and name.endswith(SENSITIVE_PROJECTIONS)):
            continue
        if use_more_bits(int(match.group(1)), n_layers) or (every_v_proj and name.endswith(".v_proj")):
            keep.append(name)
    return keep


def skip_modules(quantization, model=None) -> list[str]:
    """spec.quantization.skipModules, plus the sensitive projections of `model` when mixedPrecision
    is `sensitive` (bitsandbytes matches a full module name exactly).

    Under grouped-query attention every v_proj stays 16-bit: it is n_kv_heads/n_heads the size of
    q_proj (1/3 on SmolLM2, 1/7 on Qwen2.5-7B), so this costs little, and on the quickstart student it
    took the keyword hits from 19/24 to 21/24 for 5 MB (docs/results.md §3).
    """
    skip = list(quantization.skip_modules)
    if quantization.mixed_precision == "sensitive" and model is not None:
        config = model.config
        gqa = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
        names = [n for n, _ in model.named_modules()]
        skip += sensitive_modules(names, config.num_hidden_layers, every_v_proj=gqa)
    return skip


def bnb_config(quantization, model=None):
    """The BitsAndBytesConfig for spec.quantization (None for method: none); `model` is the merged
    student, whose module names mixedPrecision needs."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization.method == "none":
        return None
    skip = skip_modules(quantization, model)
    if quantization.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.method,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        llm_int8_skip_modules=skip,
    )


def merge_student(adapter_dir: Path, placement=None):
    """(merged model, tokenizer): the distilled LoRA folded into its base weights, where
    `placement` (jobs/devices.StageDevice) puts it; CPU fp32 when None."""
    from meddistill.modelsource import load_model

    model, tokenizer = load_model(str(adapter_dir), **(placement.load_kwargs() if placement else {"dtype": "float32"}))
    return model.merge_and_unload(), tokenizer


def run(ctx: StageContext, out: Path) -> StageOutput:
    from meddistill.jobs import devices
    from meddistill.modelsource import load_model, model_weight_bytes, peak_gpu_memory_bytes, reset_peak_gpu_memory

    quantization = ctx.spec.quantization
    adapter = ctx.input_dir("distill") / "adapter"
    # Merged and quantized on the GPU the stage's driver reserves (operator/sizing.py: teacher.resources,
    # as for evaluate); bitsandbytes quantizes there as it loads. On CPU, in fp32 as before.
    placement = devices.stage_device("quantize", ctx.spec.teacher.resources.gpus_per_worker,
                                     devices.checkpoint_weight_bytes(str(adapter)))
    if placement.on_gpu:
        reset_peak_gpu_memory()
    merged, tokenizer = merge_student(adapter, placement)
    bytes_before = model_weight_bytes(merged)
    for old in out.iterdir():  # a previous attempt's files would end up in the manifest
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    config = bnb_config(quantization, merged)
    if config is None:
        merged.save_pretrained(out, safe_serialization=True)
        bytes_after = bytes_before
    else:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merged-") as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            del merged
            quantized, _ = load_model(tmp, quantization_config=config, **placement.load_kwargs())
            bytes_after = model_weight_bytes(quantized)
            quantized.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics = {
        "method": quantization.method,
        "unquantized_modules": len(config.llm_int8_skip_modules) if config is not None else 0,
        "device": placement.device,
        "dtype": placement.dtype,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": bytes_after,
        "weight_reduction_pct": round(100 * (1 - bytes_after / bytes_before), 2),
    }
    if placement.on_gpu:
        metrics["peak_gpu_bytes"] = peak_gpu_memory_bytes()
    log.info("quantize: %s", metrics)
    return StageOutput(config=quantization.model_dump(by_alias=True), metrics=metrics)
