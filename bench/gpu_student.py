"""The paper's 7B student on a real GPU: 16-bit vs 4-bit memory and latency, and our engine's batching.

Needs CUDA and bitsandbytes; no hub. The model is Qwen2.5-7B-shaped (the architecture of
DeepSeek-R1-Distill-Qwen-7B) with random weights: memory and compute do not depend on the values,
and no 7B checkpoint is reachable here. Token ids stand in for text (IdTokenizer), so the numbers
are the model's and the engine's, not a tokenizer's.

  1. bf16: built on the GPU, saved as safetensors, reloaded with `from_pretrained` (as the pipeline
     reloads a merged student);
  2. NF4 + double quant: the same checkpoint loaded with the BitsAndBytesConfig that
     jobs/quantize.py builds for `quantization: {method: nf4, doubleQuant: true, computeDtype: bfloat16}`.
For each: weight memory (torch.cuda.memory_allocated after loading), peak memory while generating,
latency of one question (128-token prompt, 64 new tokens, batch 1), and output tokens/s at
concurrency 1, 16 and 64 for (b) our continuous-batching engine vs (d) one static padded
`generate` over the same prompts (median of --repeats alternating runs), with b/d and the greedy
agreement between the two.

    python bench/gpu_student.py [--layers 28] [--new-tokens 64] [--concurrency 1,16,64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import statistics
import tempfile
import time

import torch

PROMPT_LENGTHS = (96, 128, 160, 192)  # mixed lengths, so left padding and joins matter


class IdTokenizer:
    """What the engine needs from a tokenizer, for a random-weight model: ids in, ids as text out."""

    eos_token_id = 151643  # Qwen2.5's <|endoftext|>
    pad_token_id = 151643

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def qwen7b_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       tie_word_embeddings=False, eos_token_id=151643, bos_token_id=151643)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 150000, (PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)],), generator=g).tolist()
            for i in range(count)]


def static(model, batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    longest = max(map(len, batch))
    ids = torch.full((len(batch), longest), IdTokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), 1
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=IdTokenizer.pad_token_id)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return n * len(batch) / seconds, out[:, longest:].tolist()


def engine_run(engine, batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    from meddistill.serve.engine import GenerationParams

    async def all_of():
        start = time.perf_counter()
        texts = await asyncio.gather(*(collect(ids) for ids in batch))
        return n * len(batch) / (time.perf_counter() - start), texts

    async def collect(ids):
        parts = []
        async for chunk in engine.stream(ids, GenerationParams(max_tokens=n, ignore_eos=True)):
            parts.append(chunk.text)
        return [int(t) for t in "".join(parts).split()]

    return asyncio.run(all_of())


def measure(label: str, model, levels: list[int], n: int, repeats: int) -> dict:
    from meddistill.serve.engine import TransformersEngine

    row = {"weights": torch.cuda.memory_allocated()}
    torch.cuda.reset_peak_memory_stats()
    static(model, prompts(1, seed=99), 4)  # warm-up (kernels, allocator)
    one = [prompts(1)[0][:128]]
    latency = []
    for _ in range(3):
        t0 = time.perf_counter()
        static(model, one, n)
        latency.append(time.perf_counter() - t0)
    row["latency"] = sorted(latency)[1]
    engine = TransformersEngine(model, IdTokenizer(), max_batch_size=max(levels), max_model_len=4096,
                                max_waiting=max(levels))
    engine_run(engine, prompts(2, seed=98), 4)  # warm-up
    for c in levels:
        batch, bs, ds = prompts(c), [], []
        for _ in range(repeats):  # alternate; the first pass of a new shape pays for kernel and allocator warm-up
            d, d_ids = static(model, batch, n)
            b, b_ids = engine_run(engine, batch, n)
            bs.append(b)
            ds.append(d)
        b, d = statistics.median(bs), statistics.median(ds)
        same = sum(x == y for x, y in zip(b_ids, d_ids))
        row[c] = (b, d, same)
        print(f"  {label} concurrency {c:>3}: engine {b:8.1f} tok/s, static generate {d:8.1f} tok/s, b/d {b / d:5.2f}, "
              f"greedy outputs identical {same}/{c}", flush=True)
    engine.shutdown()
    row["peak"] = torch.cuda.max_memory_allocated()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (Qwen2.5-7B: 28)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per level; the median is reported")
    opts = parser.parse_args()
    levels = [int(c) for c in opts.concurrency.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the CPU numbers are bench/serve_throughput.py and bench/quant_memory.py)")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from meddistill.modelsource import model_weight_bytes

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; Qwen2.5-7B shape, {opts.layers} layers, random weights",
          flush=True)
    tmp = tempfile.mkdtemp(prefix="qwen7b-shape-")
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(qwen7b_config(opts.layers), dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        print(f"built and saved in {time.perf_counter() - t0:.0f}s", flush=True)

        rows = {}
        for label, quant in [
            ("bf16", None),
            ("nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"])),
        ]:
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                         quantization_config=quant, device_map={"": 0})
            model.eval()
            print(f"{label}: loaded in {time.perf_counter() - t0:.0f}s, "
                  f"{model_weight_bytes(model) / 2**30:.2f} GiB of weight tensors", flush=True)
            rows[label] = measure(label, model, levels, opts.new_tokens, opts.repeats)
            rows[label]["weights"] -= base
            del model
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    b16, q4 = rows["bf16"], rows["nf4"]
    print(f"\n{'':>6} {'weights GiB':>12} {'peak GiB':>9} {'latency/q s':>12}  " +
          "  ".join(f"{'c=' + str(c) + ' b|d tok/s':>22}" for c in levels))
    for label, r in rows.items():
        print(f"{label:>6} {r['weights'] / 2**30:>12.2f} {r['peak'] / 2**30:>9.2f} {r['latency']:>12.2f}  " +
              "  ".join(f"{r[c][0]:>10.1f}|{r[c][1]:<10.1f}" for c in levels))
    print(f"NF4 vs bf16: weight memory {100 * (q4['weights'] / b16['weights'] - 1):+.1f}% (paper: -64.7%), "
          f"latency {100 * (q4['latency'] / b16['latency'] - 1):+.1f}%")
    for c in levels:
        print(f"concurrency {c}: b/d bf16 {b16[c][0] / b16[c][1]:.2f}, nf4 {q4[c][0] / q4[c][1]:.2f}")


if __name__ == "__main__":
    main()
