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
import shutil
import tempfile
from pathlib import Path

from meddistill.jobs.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


def bnb_config(quantization):
    """The BitsAndBytesConfig for spec.quantization (None for method: none)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization.method == "none":
        return None
    if quantization.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=quantization.skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.method,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        llm_int8_skip_modules=quantization.skip_modules,
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
    config = bnb_config(quantization)
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
