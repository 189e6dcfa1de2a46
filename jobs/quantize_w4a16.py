"""The `w4a16` format: the merged 16-bit student -> 4-bit weights, 16-bit activations -> <quantize artifact>/w4a16/.

    merged HF folder -> calibration set (seeded medical records from the training data)
      -> per decoder layer: Hessians of its linear layers' inputs (forward hooks) -> GPTQ
         (or round-to-nearest: quantization.w4a16Method) -> fake-quantized weights in place
      -> compressed-tensors: scheme on each quantized linear, its own pack-quantized compressor
      -> save_pretrained + quantization_config (quant_method compressed-tensors)

The scheme is compressed-tensors' W4A16 preset: int4, symmetric, one bf16 scale per group of 128
input columns, activations untouched. vLLM serves it with its CompressedTensorsWNA16 (Marlin)
kernels, which need a layer's input width to be a multiple of 128 and its output width a multiple
of 64; a layer that is not stays in 16 bits (listed in `ignore`, as lm_head and
quantization.skipModules are), and so do the other members of a projection vLLM fuses with it
(q/k/v, gate/up), because vLLM refuses a fused layer with mixed schemes. On the quickstart's
SmolLM2 student (hidden size 576) that leaves only down_proj 4-bit; a 7B student (3584) is 4-bit
throughout. transformers loads the folder on any device (its compressed-tensors integration,
`dequantize=True` on CPU).

GPTQ (Frantar et al. 2022, the algorithm llm-compressor's GPTQModifier runs): each column is
rounded in turn and its error is spread over the columns not yet rounded, weighted by the inverse
Hessian H = X^T X of the layer's calibration inputs, so the layer's output on medical text moves
least. Layers are done in order and each layer's inputs come from the model with the layers before
it already quantized, as llm-compressor's sequential pipeline does.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
GROUP_SIZE = 128
BITS = 4
SAVE_DTYPE = "bfloat16"  # the activations' dtype; vLLM's Marlin runs fp16 or bf16, and bf16 keeps fp32's range
CALIBRATION_RECORDS = 32  # llm-compressor's examples use 512 x 2048 tokens; a few dozen already beat RTN here
CALIBRATION_MAX_TOKENS = 512
DAMPING = 0.01  # of the mean Hessian diagonal, GPTQ's default
MARLIN_MIN_K, MARLIN_MIN_N = 128, 64  # vLLM marlin_utils: GPTQ_MARLIN_MIN_THREAD_K / _N
FUSED_IN_VLLM = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json")
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def scheme():
    """compressed-tensors' W4A16 scheme (int4 symmetric, group 128, no activation quantization) on Linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=BITS, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE,
                               dynamic=False)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def quantization_config(ignore: list[str]):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups={"group_0": scheme()}, ignore=sorted(ignore), format="pack-quantized")


def plan_modules(model, skip: list[str]) -> tuple[list[str], dict[str, str]]:
    """(names of the linear layers to quantize, {name: why it stays 16-bit}) for every nn.Linear.

    `skip` holds names or name suffixes (quantization.skipModules: "lm_head"; mixedPrecision's full names)."""
    import torch

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    keep: dict[str, str] = {}
    for name, module in linears.items():
        if any(name == s or name.endswith("." + s) for s in skip):
            keep[name] = "quantization.skipModules"
        elif module.in_features % MARLIN_MIN_K or module.in_features % GROUP_SIZE or module.out_features % MARLIN_MIN_N:
            keep[name] = (f"shape {module.out_features}x{module.in_features}: vLLM's 4-bit kernel needs input width % "
                          f"{MARLIN_MIN_K} and output width % {MARLIN_MIN_N}")
    for name in list(keep):  # a fused projection is quantized whole or not at all
        prefix, _, leaf = name.rpartition(".")
        for group in FUSED_IN_VLLM:
            if leaf in group:
                for other in group:
                    sibling = f"{prefix}.{other}"
                    if sibling in linears and sibling not in keep:
                        keep[sibling] = f"fused in vLLM with {name}, which stays 16-bit"
    return [n for n in linears if n not in keep], keep


def calibration_samples(ctx, tokenizer, count: int = CALIBRATION_RECORDS) -> list[list[int]]:
    """Token ids of `count` training records (prompt + answer, as training renders them), seeded by
    student.training.seed and decontaminated against the evaluation sets like all training data."""
    from meddistill.jobs.sft_data import load_training_records, tokenize_example

    spec = ctx.spec
    data = load_training_records(ctx, spec.teacher.datasets, count, spec.student.training.seed)
    length = min(spec.student.training.max_seq_length, CALIBRATION_MAX_TOKENS)
    return [tokenize_example(r, tokenizer, spec.evaluation.prompt_style, length)["input_ids"] for r in data.records]


def group_scales(weight, dtype):
    """Per (row, group of GROUP_SIZE columns) scale, rounded to `dtype`: compressed-tensors' symmetric rule
    (calculate_qparams: absmax / ((qmax - qmin) / 2) = absmax / 7.5, a zero scale made tiny), written out
    because calling it per group costs 30 ms."""
    import torch

    absmax = weight.reshape(weight.shape[0], -1, GROUP_SIZE).abs().amax(-1).float()
    scales = (absmax / ((2 ** BITS - 1) / 2)).to(dtype)
    return torch.where(scales == 0, torch.finfo(dtype).eps, scales).to(torch.float32)


def round_column(w, scale, dtype):
    """(int value, dequantized value as the loader computes it: int * scale in `dtype`) of one column."""
    import torch

    q = torch.clamp(torch.round(w / scale), -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1)
    return q, (q.to(dtype) * scale.to(dtype)).to(torch.float32)


def rtn(weight, dtype):
    """Round-to-nearest: (dequantized weight fp32, scales fp32)."""
    scales = group_scales(weight.float(), dtype)
    expanded = scales.repeat_interleave(GROUP_SIZE, dim=1)
    return round_column(weight.float(), expanded, dtype)[1], scales


def gptq(weight, hessian, dtype):
    """GPTQ, one block of columns per group, each group's scale taken from its weights as the earlier
    groups' errors left them (llm-compressor's default, no act-order): (dequantized weight fp32, scales fp32)."""
    import torch

    W = weight.detach().float().clone()
    H = hessian.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0  # inputs never active in calibration: nothing to preserve
    H[dead, dead] = 1
    W[:, dead] = 0
    H += DAMPING * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    # The upper Cholesky factor of H^-1: row i holds how column i's error spreads over columns i..n.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scales = torch.zeros(rows, cols // GROUP_SIZE, device=W.device)
    for g, i1 in enumerate(range(0, cols, GROUP_SIZE)):
        i2 = i1 + GROUP_SIZE
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, GROUP_SIZE, device=W.device), Hinv[i1:i2, i1:i2]
        scales[:, g:g + 1] = group_scales(W1, dtype)
        for i in range(GROUP_SIZE):
            _, q = round_column(W1[:, i], scales[:, g], dtype)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scales


class _LayerDone(Exception):
    """Raised after the calibrated decoder layer: the layers after it (and lm_head) need not run."""


def input_hessians(model, names: list[str], samples: list[list[int]], layer: str | None = None) -> dict:
    """H = sum of x x^T over every calibration token reaching each named linear layer (fp32); each forward
    stops after the decoder layer named `layer`, which holds them."""
    import torch

    from meddistill.modelsource import input_device

    modules = dict(model.named_modules())

    def stop(*_):
        raise _LayerDone

    hessians = {n: torch.zeros(modules[n].in_features, modules[n].in_features, device=modules[n].weight.device)
                for n in names}

    def hook(name):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hessians[name].addmm_(x.T, x)
        return accumulate

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    if layer in modules:
        handles.append(modules[layer].register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for ids in samples:  # one record at a time: no padding tokens in the statistics
                try:
                    model(torch.tensor([ids], device=input_device(model)))
                except _LayerDone:
                    pass
    finally:
        for h in handles:
            h.remove()
    return hessians


def quantize_weights(model, names: list[str], samples: list[list[int]] | None, dtype) -> dict:
    """Replace each named linear layer's weight with its 4-bit values dequantized (what a loader computes)
    and return {name: scales}. GPTQ over `samples` one decoder layer at a time; RTN when `samples` is None."""
    import torch

    modules = dict(model.named_modules())
    scales = {}
    by_layer: dict[str, list[str]] = {}
    for name in names:
        match = _LAYER.match(name)
        by_layer.setdefault(match.group(1) if match else name, []).append(name)
    for layer, members in by_layer.items():
        hessians = input_hessians(model, members, samples, layer) if samples is not None else {}
        for name in members:
            weight = modules[name].weight
            if samples is None:
                dq, scales[name] = rtn(weight.data, dtype)
            else:
                dq, scales[name] = gptq(weight.data, hessians.pop(name), dtype)
            with torch.no_grad():
                weight.copy_(dq.to(weight.dtype))
        log.info("w4a16: %s quantized (%s)", layer, "gptq" if samples is not None else "rtn")
    return scales


def save_compressed(model, scales: dict, ignore: list[str], out: Path) -> None:
    """Attach the scheme and the scales, pack with compressed-tensors' own compressor, save weights +
    quantization_config. `model` holds the fake-quantized weights in SAVE_DTYPE."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    config = quantization_config(ignore)
    config.quantization_status = QuantizationStatus.FROZEN  # scales are final: no calibration by compressed-tensors
    apply_quantization_config(model, config, show_progress=False)
    modules = dict(model.named_modules())
    quantized = {n for n, m in modules.items() if getattr(m, "quantization_scheme", None) is not None}
    if quantized != set(scales):
        raise RuntimeError(f"w4a16: compressed-tensors matched {sorted(quantized ^ set(scales))} differently from the plan")
    with torch.no_grad():
        for name, s in scales.items():
            modules[name].weight_scale.copy_(s.to(modules[name].weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out, safe_serialization=True)
    compressor.update_config(str(out))


def build_w4a16(ctx, merged_dir: Path, out: Path, placement=None) -> dict:
    """Write the w4a16 folder `out` from the merged student in `merged_dir` (on `placement`, a
    jobs/devices.StageDevice; CPU fp32 when None); returns the format's metrics."""
    import torch

    from meddistill.jobs.quantize import skip_modules
    from meddistill.modelsource import load_model, model_weight_bytes

    method = ctx.spec.quantization.w4a16_method
    model, tokenizer = load_model(str(merged_dir), **(placement.load_kwargs() if placement else {"dtype": "float32"}))
    dtype = getattr(torch, SAVE_DTYPE)
    names, keep = plan_modules(model, skip_modules(ctx.spec.quantization, model))
    for name, why in keep.items():
        log.info("w4a16: %s stays 16-bit (%s)", name, why)
    samples = calibration_samples(ctx, tokenizer) if method == "gptq" and names else None
    bytes_before = model_weight_bytes(model)
    scales = quantize_weights(model, names, samples, dtype)
    model.to(dtype)
    save_compressed(model, scales, sorted(keep), out)
    for name in COPIED_FILES:
        if (merged_dir / name).is_file():
            shutil.copy2(merged_dir / name, out / name)
    weight_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    metrics = {"w4a16_method": method, "w4a16_dir": out.name, "w4a16_quantized_modules": len(names),
               "w4a16_unquantized_modules": len(keep), "w4a16_calibration_records": len(samples or []),
               "w4a16_weight_bytes_before": bytes_before, "w4a16_file_bytes": weight_bytes}
    log.info("quantize w4a16: %s", metrics)
    return metrics
