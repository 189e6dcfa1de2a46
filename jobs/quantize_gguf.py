"""The `gguf` format: the merged 16-bit student -> GGUF f16 -> llama.cpp's quantizer -> <quantize artifact>/gguf/.

    merged HF folder --hf_to_gguf--> model-F16.gguf (temporary) --llama_model_quantize--> model-<ggufType>.gguf

The folder also holds the student's tokenizer files: the serving engine and the evaluation tokenize
with the same Hugging Face tokenizer (and chat template) as every other row, and hand llama.cpp
token ids. Everything in it is listed in the quantize stage's manifest (the stage writes it last).
Weight bytes are the GGUF's tensor data (metadata and vocabulary excluded), as the other rows count
their parameters.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from meddistill.quantized_formats import gguf_file_name

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


def llama_ftype(gguf_type: str) -> int:
    import llama_cpp

    return {"Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
            "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[gguf_type]


def quantize_file(source: Path, target: Path, gguf_type: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (what `llama-quantize` runs), in process."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(gguf_type)
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {gguf_type} (return code {rc})")


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensor data in a GGUF file."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors))


def build_gguf(merged_dir: Path, out: Path, gguf_type: str) -> dict:
    """Write <out>/model-<gguf_type>.gguf and the tokenizer files; returns the format's metrics."""
    from meddistill.jobs.hf_to_gguf import hf_to_gguf
    from meddistill.llamacpp_check import require_llamacpp

    # The GGUF is evaluated and served by llama.cpp: where it cannot run, stop here with the reason.
    require_llamacpp("quantization.formats gguf")
    out.mkdir(parents=True, exist_ok=True)
    target = out / gguf_file_name(gguf_type)
    with tempfile.TemporaryDirectory(dir=merged_dir.parent, prefix=".gguf-f16-") as tmp:
        f16 = hf_to_gguf(merged_dir, Path(tmp) / "model-F16.gguf")
        f16_bytes = gguf_weight_bytes(f16)
        quantize_file(f16, target, gguf_type)
    for name in TOKENIZER_FILES:
        if (merged_dir / name).is_file():
            shutil.copy2(merged_dir / name, out / name)
    weight_bytes = gguf_weight_bytes(target)
    metrics = {"gguf_type": gguf_type, "gguf_file": f"{out.name}/{target.name}", "gguf_weight_bytes_f16": f16_bytes,
               "gguf_weight_bytes": weight_bytes, "gguf_file_bytes": target.stat().st_size}
    log.info("quantize gguf: %s", metrics)
    return metrics
