"""Recipe: merge the student's LoRA into its base, then make each 4-bit format of quantization.formats.

    load base + adapter -> merge_and_unload -> save merged (temp) ->
      nf4:  from_pretrained with BitsAndBytesConfig (nf4 | fp4 | int8; `none` keeps the merged
            weights) -> save_pretrained into the artifact's root folder
      gguf: llama.cpp GGUF (quantization.ggufType) into its gguf/ subfolder (jobs/quantize_gguf.py)
      w4a16: compressed-tensors W4A16, GPTQ or RTN (quantization.w4a16Method), into its w4a16/
            subfolder (jobs/quantize_w4a16.py)

Which formats: meddistill/quantized_formats.resolve_formats, shared with evaluation and serving.

On the GPU the stage reserves (jobs/devices.py), in its 16-bit dtype; on CPU in fp32.

With nf4, the artifact directory itself is the quantized model (config.json, safetensors with the packed
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
    """Merge once, then make every format of resolve_formats(spec): nf4 in the artifact's root
    folder (what serving and the `quantized` row load), gguf and w4a16 in their subfolders."""
    from meddistill.jobs import devices
    from meddistill.jobs.stage import StageError
    from meddistill.modelsource import model_weight_bytes, peak_gpu_memory_bytes, reset_peak_gpu_memory
    from meddistill.quantized_formats import GGUF_DIR, W4A16_DIR, FormatError, resolve_formats

    try:
        formats = resolve_formats(ctx.spec)
    except FormatError as err:
        raise StageError(str(err)) from None
    quantization = ctx.spec.quantization
    adapter = ctx.input_dir("distill") / "adapter"
    # Merged and quantized on the GPU the stage's driver reserves (operator/sizing.py: teacher.resources,
    # as for evaluate); bitsandbytes quantizes there as it loads. On CPU, in fp32 as before.
    placement = devices.stage_device("quantize", ctx.spec.teacher.resources.gpus_per_worker,
                                     devices.checkpoint_weight_bytes(str(adapter)))
    if placement.on_gpu:
        reset_peak_gpu_memory()
    merged, tokenizer = merge_student(adapter, placement)
    for old in out.iterdir():  # a previous attempt's files would end up in the manifest
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    metrics = {"formats": formats, "device": placement.device, "dtype": placement.dtype}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merged-") as tmp:
        merged_dir = Path(tmp)
        merged.save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
        if "nf4" in formats:
            config, bytes_before = bnb_config(quantization, merged), model_weight_bytes(merged)
            del merged  # the 4-bit copy loads from merged_dir: never both in memory
            metrics.update(quantize_bnb(config, bytes_before, merged_dir, out, quantization, placement))
        else:
            del merged
        if "gguf" in formats:
            from meddistill.jobs.quantize_gguf import build_gguf

            metrics.update(build_gguf(merged_dir, out / GGUF_DIR, quantization.gguf_type))
        if "w4a16" in formats:
            from meddistill.jobs.quantize_w4a16 import build_w4a16

            metrics.update(build_w4a16(ctx, merged_dir, out / W4A16_DIR, placement))
    if placement.on_gpu:
        metrics["peak_gpu_bytes"] = peak_gpu_memory_bytes()
    log.info("quantize: %s", metrics)
    return StageOutput(config=quantization.model_dump(by_alias=True), metrics=metrics)


def quantize_bnb(config, bytes_before: int, merged_dir: Path, out: Path, quantization, placement) -> dict:
    """The nf4 format (bitsandbytes, quantization.method; `config` from bnb_config) into `out` itself,
    weights and tokenizer; returns its metrics."""
    from meddistill.modelsource import load_model, model_weight_bytes

    model, tokenizer = load_model(str(merged_dir), quantization_config=config, **placement.load_kwargs())
    bytes_after = model_weight_bytes(model) if config is not None else bytes_before
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "method": quantization.method,
        "unquantized_modules": len(config.llm_int8_skip_modules) if config is not None else 0,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": bytes_after,
        "weight_reduction_pct": round(100 * (1 - bytes_after / bytes_before), 2),
    }
