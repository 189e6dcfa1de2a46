"""Where an inference stage (evaluate, quantize, distill-data) puts its model: device, dtype, device_map.

One decision per model load, from the GPUs the stage's Ray task reserved and what torch sees:

  no GPU reserved, or none visible   cpu, float32: the CPU path as it always was (the evaluation's
                                     16-bit student row picks its own CPU dtype)
  GPUs reserved and visible          bfloat16 (float16 where the GPU has no bf16, e.g. V100/T4);
                                     cuda:0 when the weights fit one GPU's free memory with room
                                     for activations and the KV cache, else device_map="auto"
                                     (accelerate spreads the layers over the visible GPUs, and the
                                     CPU beyond them): the 70B teacher on 8 x 80 GB

The weights are sized before loading from the checkpoint's safetensors headers (no tensor is
read), in the dtype they will load in. Ray sets CUDA_VISIBLE_DEVICES to the task's GPUs, so
"visible" is what the task reserved.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The weights may take this share of one GPU's free memory; the rest is for activations, the KV
# cache of batched generation and the CUDA context.
FIT_FRACTION = 0.8
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class StageDevice:
    device: str  # "cpu" or "cuda:0"; with device_map="auto", the first GPU (inputs follow input_device(model))
    dtype: str  # a torch dtype name, as load_model takes it
    device_map: str | None  # None: the whole model on `device`; "auto": spread by accelerate

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def load_kwargs(self) -> dict:
        """The keyword arguments of modelsource.load_model."""
        return asdict(self)


def stage_device(stage: str, gpus_reserved: int, weight_bytes: int, *, visible_gpus: int | None = None,
                 free_bytes: int | None = None, bf16_supported: bool | None = None) -> StageDevice:
    """The device decision (module docstring), logged. `weight_bytes`: the model's weights at 16 bits
    (checkpoint_weight_bytes). `visible_gpus`, `free_bytes` (free on each GPU, the first one
    measured) and `bf16_supported` are observed from torch when None; tests pass them in."""
    if gpus_reserved > 0:
        visible_gpus, free_bytes, bf16_supported = _observe(visible_gpus, free_bytes, bf16_supported)
    if gpus_reserved <= 0 or not visible_gpus:
        if gpus_reserved > 0:
            log.warning("%s: %d GPU(s) reserved but torch sees none (driver? CUDA_VISIBLE_DEVICES?); running on CPU",
                        stage, gpus_reserved)
        log.info("%s: model on cpu in float32", stage)
        return StageDevice("cpu", "float32", None)
    dtype = "bfloat16" if bf16_supported else "float16"
    fits = weight_bytes <= FIT_FRACTION * free_bytes
    choice = StageDevice("cuda:0", dtype, None if fits else "auto")
    log.info("%s: model on %s in %s%s (weights %.2f GiB, %.1f GiB free on each of %d GPU(s))", stage,
             choice.device, dtype, "" if fits else ", device_map=auto", weight_bytes / 2**30, free_bytes / 2**30,
             visible_gpus)
    if weight_bytes > FIT_FRACTION * free_bytes * visible_gpus:
        log.warning("%s: the weights exceed the GPUs' free memory; accelerate offloads the rest to CPU (slow). "
                    "Reserve more GPUs in spec.teacher.resources.gpusPerWorker", stage)
    return choice


def _observe(visible_gpus: int | None, free_bytes: int | None, bf16_supported: bool | None) -> tuple[int, int, bool]:
    import torch

    if visible_gpus is None:
        visible_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible_gpus and free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(0)[0]
    if visible_gpus and bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return visible_gpus, free_bytes or 0, bool(bf16_supported)


def checkpoint_weight_bytes(source: str, float_bytes: int = 2) -> int:
    """Bytes of a model's weights once loaded with `float_bytes` per floating-point element (packed
    integer tensors, e.g. bitsandbytes 4-bit, as stored), read from the safetensors headers of the
    resolved source and, for a PEFT adapter, of its base model too. Checkpoints without
    safetensors count their files' sizes."""
    from meddistill.modelsource import _adapter_config, resolve_model_source

    path = resolve_model_source(source)
    adapter = _adapter_config(path)
    total = _folder_weight_bytes(path, float_bytes)
    if adapter is not None:
        total += _folder_weight_bytes(resolve_model_source(adapter["base_model_name_or_path"]), float_bytes)
    return total


def _folder_weight_bytes(folder: Path, float_bytes: int) -> int:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return sum(p.stat().st_size for p in folder.glob("*.bin"))
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            stored = info["data_offsets"][1] - info["data_offsets"][0]
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            total += float_bytes * numel if info["dtype"] in _FLOAT_DTYPES else stored
    return total


def _bytes_per(dtype: str) -> int:
    return 4 if dtype == "float32" else 2
