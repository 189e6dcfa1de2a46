"""Which 4-bit formats a job makes (spec.quantization.formats) and where each can be served.

One function decides for the quantize stage, the evaluate stage and the serving app, so the three
never disagree. Torch-free: the operator and `serve.config` import it.

    nf4    bitsandbytes (quantization.method), the quantize artifact's root folder; transformers or vLLM
    gguf   llama.cpp GGUF (quantization.ggufType) in <quantize artifact>/gguf/; llama.cpp on CPU
    w4a16  compressed-tensors W4A16 (jobs/quantize_w4a16.py) in <quantize artifact>/w4a16/; vLLM on GPU
"""
from __future__ import annotations

from typing import Any

BUILT = ("nf4", "gguf", "w4a16")  # formats the quantize stage can make today
# Where a replica can serve each format: gguf's engine is llama.cpp's CPU build (llama-cpp-python's wheel);
# w4a16's is vLLM's Marlin kernels (a CPU replica could only decompress it to 16 bits: no gain).
SERVED_ON = {"nf4": ("cpu", "gpu"), "gguf": ("cpu",), "w4a16": ("gpu",)}
GGUF_DIR = "gguf"
W4A16_DIR = "w4a16"


class FormatError(ValueError):
    """spec.quantization.formats asks for something this version or this hardware cannot do."""


def default_formats(gpu: bool) -> list[str]:
    """Formats made when quantization.formats is unset. nf4 on both for now (the paper's format);
    whether CPU jobs also get gguf by default is decided from bench/quant_formats.py's numbers."""
    return ["nf4"]


def requested_formats(spec: Any) -> list[str]:
    """spec.quantization.formats or the default, unchecked (rendering a serve config must not fail
    where the quantize stage, which checks them, already has)."""
    return list(dict.fromkeys(spec.quantization.formats or default_formats(spec.serving.gpus_per_replica > 0)))


def resolve_formats(spec: Any) -> list[str]:
    """spec.quantization.formats, or the per-hardware default (serving.gpusPerReplica decides);
    FormatError naming the field when a format is not built yet or cannot be served there."""
    gpu = spec.serving.gpus_per_replica > 0
    formats = requested_formats(spec)
    missing = [f for f in formats if f not in BUILT]
    if missing:
        raise FormatError(
            f"spec.quantization.formats: {', '.join(missing)} is not built by this version of MedDistill "
            f"(it makes {', '.join(BUILT)}); remove it from quantization.formats")
    where = "gpu" if gpu else "cpu"
    if not any(where in SERVED_ON[f] for f in formats):
        raise FormatError(
            f"spec.quantization.formats: {formats} cannot be served on "
            f"{'a GPU' if gpu else 'CPU'} replicas (serving.gpusPerReplica={spec.serving.gpus_per_replica}): "
            f"gguf is served by llama.cpp on CPU only, w4a16 by vLLM on GPU only; add nf4 to quantization.formats, "
            f"or set serving.gpusPerReplica "
            f"to {0 if gpu else 1}")
    return formats


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"
