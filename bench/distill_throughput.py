"""Student training throughput: cached teacher top-k vs the teacher running online, side by side.

Same student (SmolLM2-135M pruned to --keep layers, LoRA r=16 on q/k/v/o), same batches, same
loss code (meddistill.jobs.distill.batch_loss); the only difference is where the teacher's
distribution comes from. The cache's one-off cost (the distill-data stage) is timed separately.
Run: python bench/distill_throughput.py [--steps 6 --batch 4 --seq 256 --keep 24]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--keep", type=int, default=24)
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()

    from meddistill.data import load_dataset
    from meddistill.jobs.distill import batch_loss, collate_distill
    from meddistill.jobs.distill_data import teacher_answer_tensors
    from meddistill.jobs.sft_data import collate, tokenize_example
    from meddistill.jobs.student import keep_layer_indices, prune_layers
    from meddistill.modelsource import load_model
    from meddistill.spec.models import Distillation, Lora

    teacher, tok = load_model("builtin:smollm2-135m-instruct", dtype="float32")
    records = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#train", limit=args.steps * args.batch).records
    examples = [tokenize_example(r, tok, "plain", args.seq) for r in records]
    chunks = [examples[i : i + args.batch] for i in range(0, len(examples), args.batch)][: args.steps]

    t0 = time.perf_counter()
    cached = []
    for chunk in chunks:  # what the distill-data stage does once
        rows = teacher_answer_tensors(teacher, collate(chunk, tok.pad_token_id), "logits", args.top_k, Distillation().temperature)
        cached.append([{**e, **r} for e, r in zip(chunk, rows)])
    cache_s = time.perf_counter() - t0

    def student():
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        s, _ = load_model("builtin:smollm2-135m-instruct", dtype="float32")
        prune_layers(s, keep_layer_indices(s.config.num_hidden_layers, args.keep, "uniform"))
        lora = Lora()
        s = get_peft_model(s, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        s.train()
        return s, torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-4)

    def run(mode_batches, teacher_model, dist) -> float:
        model, opt = student()
        batch_loss(model, teacher_model, collate_distill(mode_batches[0], tok.pad_token_id), dist)[0].backward()  # warm-up
        opt.zero_grad()
        start = time.perf_counter()
        for chunk in mode_batches:
            loss = batch_loss(model, teacher_model, collate_distill(chunk, tok.pad_token_id), dist)[0]
            loss.backward()
            opt.step()
            opt.zero_grad()
        return sum(len(c) for c in mode_batches) / (time.perf_counter() - start)

    cached_sps = run(cached, None, Distillation(mode="logits", teacher_cache="cached", top_k=args.top_k))
    online_sps = run(chunks, teacher, Distillation(mode="logits", teacher_cache="online"))
    n = sum(len(c) for c in chunks)
    print(f"threads={torch.get_num_threads()} samples={n} batch={args.batch} seq<={args.seq} student_layers={args.keep}")
    print(f"cached top-{args.top_k}: {cached_sps:.2f} samples/s   (one-off cache build: {cache_s:.1f}s = {n / cache_s:.2f} samples/s)")
    print(f"online teacher: {online_sps:.2f} samples/s")
    print(f"ratio cached/online: {cached_sps / online_sps:.2f}x")


if __name__ == "__main__":
    main()
