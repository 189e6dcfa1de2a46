"""Weight memory of the 4-bit (NF4, double quant) student vs 16-bit, measured side by side.

  1. the quickstart student shape (SmolLM2-135M pruned to --keep layers, 24 in quickstart.yaml): a real model, bf16 vs NF4
     loaded through transformers + bitsandbytes, bytes counted tensor by tensor (including the
     4-bit quantization state: absmax and its own double-quant constants);
  2. a Qwen2.5-7B-shaped model, too large to hold twice here: built on the `meta` device and
     counted analytically, the formula checked against real layers of that shape quantized with
     bitsandbytes on CPU (one attention and one MLP projection).
Prints the ratios. Run: python bench/quant_memory.py [--skip-real]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

BLOCK, BLOCK2 = 64, 256  # bitsandbytes 4-bit blocksize; double-quant blocksize of the absmax


def nf4_bytes(numel: int, double_quant: bool = True) -> float:
    """Packed weights + quantization state of one 4-bit tensor (bitsandbytes layout)."""
    blocks = -(-numel // BLOCK)
    if double_quant:  # absmax stored as uint8 + one fp32 scale per 256 absmax values + fp32 offset
        return numel / 2 + blocks + 4 * -(-blocks // BLOCK2) + 4
    return numel / 2 + 4 * blocks


def quant_state_bytes(weight) -> int:
    qs = weight.quant_state
    total = qs.absmax.numel() * qs.absmax.element_size()
    if qs.state2 is not None:
        total += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + 4
    return total


def model_bytes(model, with_state: bool = True) -> int:
    import bitsandbytes as bnb

    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        if with_state and isinstance(t, bnb.nn.Params4bit) and t.quant_state is not None:
            total += quant_state_bytes(t)
    return total


def analytic(config, skip=("lm_head",)) -> tuple[int, float]:
    """(16-bit bytes, NF4 bytes) of a causal LM config, from a meta-device instantiation."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    b16 = b4 = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
            b16 += module.weight.numel() * 2
            b4 += nf4_bytes(module.weight.numel())
    params = {id(p): p for p in model.parameters()}
    linear_ids = {id(m.weight) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)}
    rest = sum(p.numel() * 2 for i, p in params.items() if i not in linear_ids)
    return int(b16 + rest), b4 + rest


def check_real_layers(shapes) -> None:
    """Quantize real Linear layers of the given shapes; compare measured bytes to nf4_bytes."""
    import bitsandbytes as bnb

    for in_f, out_f in shapes:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
        layer = layer.to("cpu")  # quantizes
        measured = layer.weight.numel() * layer.weight.element_size() + quant_state_bytes(layer.weight)
        predicted = nf4_bytes(in_f * out_f)
        print(f"  real layer {in_f}x{out_f}: 16-bit {in_f * out_f * 2 / 2**20:8.1f} MiB  NF4 measured {measured / 2**20:7.2f} MiB"
              f"  formula {predicted / 2**20:7.2f} MiB  ratio {measured / (in_f * out_f * 2):.3f}")
        assert abs(measured - predicted) / predicted < 0.01, (measured, predicted)
        del layer


def real_quickstart_student(keep: int) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from meddistill.jobs.student import keep_layer_indices, prune_layers
    from meddistill.modelsource import load_model

    model, tok = load_model("builtin:smollm2-135m-instruct", dtype="bfloat16")
    prune_layers(model, keep_layer_indices(model.config.num_hidden_layers, keep, "uniform"))
    b16 = model_bytes(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        q = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"]))
    b4 = model_bytes(q)
    print(f"quickstart student (SmolLM2-135M, {keep} layers), real: bf16 {b16 / 2**20:.1f} MiB -> NF4 {b4 / 2**20:.1f} MiB: "
          f"ratio {b4 / b16:.3f} (-{100 * (1 - b4 / b16):.1f}%)  [tied 49k x 576 embedding stays 16-bit]")
    cfg16, cfg4 = analytic(model.config)
    print(f"  analytic for the same config: ratio {cfg4 / cfg16:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-real", action="store_true", help="skip the real SmolLM2 load")
    parser.add_argument("--keep", type=int, default=24, help="student layers (examples/quickstart.yaml: 24)")
    args = parser.parse_args()
    started = time.time()
    if not args.skip_real:
        real_quickstart_student(args.keep)
    from transformers import Qwen2Config

    qwen7b = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
    b16, b4 = analytic(qwen7b)
    print(f"Qwen2.5-7B shape (meta device, analytic): bf16 {b16 / 2**30:.2f} GiB -> NF4 {b4 / 2**30:.2f} GiB: "
          f"ratio {b4 / b16:.3f} (-{100 * (1 - b4 / b16):.1f}%)  [lm_head kept 16-bit]")
    b16_all, b4_all = analytic(qwen7b, skip=())
    print(f"  with lm_head quantized too: ratio {b4_all / b16_all:.3f}")
    check_real_layers([(3584, 512), (3584, 18944)])  # k_proj and gate_proj of Qwen2.5-7B
    print(f"done in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
