"""Serving throughput on this machine, all measured side by side in one run.

For concurrency 1, 4 and 16 (every request asks for exactly N new tokens, EOS ignored):
  (a) naive     one request at a time, `model.generate` each
  (b) engine    our continuous-batching TransformersEngine called directly (in process)
  (c) serve     the same engine behind our Ray Serve endpoint (HTTP, SSE streaming)
  (d) static    ONE padded `model.generate` over all the prompts: the batching ceiling
(b), (c) and (d) run --repeats times, alternating, and their medians are reported: one pass on a
shared 2-core machine moves by +-15%. The Serve app is up (idle) during all of them.
Prints tokens/s, (b)/(a), (b)/(d), (c)/(b) and time-to-first-token p50/p95 for (b) and (c).
Targets: (b)/(d) >= 1 at concurrency 16, (c)/(b) >= 0.9.

    python bench/serve_throughput.py [--model builtin:smollm2-135m-instruct] [--new-tokens 64] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import threading
import time

import torch

QUESTIONS = [
    "What is hypertension and how is it treated?", "Name three symptoms of influenza.",
    "What does an HbA1c test measure?", "How does metformin lower blood glucose?",
    "What is the first aid for a nosebleed?", "Explain the difference between type 1 and type 2 diabetes.",
    "What are common side effects of ibuprofen?", "What is the normal resting heart rate for adults?",
    "What causes iron deficiency anemia?", "How is asthma diagnosed?",
    "A 60-year-old smoker has a chronic cough. What tests should be ordered?", "What is sepsis?",
    "Why are antibiotics ineffective against viruses?", "What is the role of insulin?",
    "What are the warning signs of a stroke?", "How is a urinary tract infection treated?",
]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def naive(model, encoded, n):
    start, tokens = time.perf_counter(), 0
    for ids in encoded:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        tokens += out.shape[1] - len(ids)
    return tokens / (time.perf_counter() - start)


def static(model, tokenizer, prompts, n):
    start = time.perf_counter()
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return (out.shape[1] - batch.input_ids.shape[1]) * len(prompts) / (time.perf_counter() - start)


def engine_run(engine, encoded, n):
    from meddistill.serve.engine import GenerationParams

    async def one(ids):
        t0, first, tokens = time.perf_counter(), None, 0
        async for chunk in engine.stream(ids, GenerationParams(max_tokens=n, ignore_eos=True)):
            first = first or time.perf_counter() - t0
            tokens = chunk.completion_tokens
        return first, tokens

    async def all_of():
        start = time.perf_counter()
        results = await asyncio.gather(*(one(ids) for ids in encoded))
        return sum(t for _, t in results) / (time.perf_counter() - start), [f for f, _ in results]

    return asyncio.run(all_of())


EVENTS = [0]  # SSE data events received by serve_run so far (tokens per event shows the engine's coalescing)


def serve_run(url, model_name, questions, n):
    import httpx

    def one(question, out, i):
        body = {"model": model_name, "messages": [{"role": "user", "content": question}], "max_tokens": n,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        t0, first, tokens = time.perf_counter(), None, 0
        with httpx.stream("POST", url + "/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                EVENTS[0] += 1
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        out[i] = (first, tokens)

    out = [None] * len(questions)
    threads = [threading.Thread(target=one, args=(q, out, i)) for i, q in enumerate(questions)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(t for _, t in out) / (time.perf_counter() - start), [f for f, _ in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in process and in the replica")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating (b), (c), (d) runs per level; medians are reported (naive runs once)")
    opts = parser.parse_args()
    levels = [int(c) for c in opts.concurrency.split(",")]
    n = opts.new_tokens
    torch.set_num_threads(opts.threads)

    import ray

    from meddistill.modelsource import load_model
    from meddistill.serve.config import serving_args
    from meddistill.serve.engine import TransformersEngine
    from meddistill.serve.local import start
    from meddistill.spec.models import Serving

    # The Serve app first, so every measurement below shares the machine with the same idle Ray
    # processes; same scheduling priority as this process (Ray's default worker niceness is 15).
    os.environ["RAY_worker_niceness"] = "0"
    ray.init(num_cpus=opts.threads, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serving = Serving(max_batch_size=max(levels), max_ongoing_requests=max(levels), target_ongoing_requests=max(levels),
                      cpus_per_replica=opts.threads, min_replicas=1, max_replicas=1)
    url = start(serving_args(serving, opts.model), port=port, name="bench")

    model, tokenizer = load_model(opts.model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS]
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    engine = TransformersEngine(model, tokenizer, max_batch_size=max(levels), max_model_len=2048)
    engine_run(engine, encoded[:2], 4)  # warm-ups
    serve_run(url, serving.model_name, QUESTIONS[:2], 4)
    rows = {}
    for c in levels:
        print(f"concurrency {c}: naive, then {opts.repeats} x (engine, serve, static) ...", flush=True)
        r = rows[c] = {"a": naive(model, encoded[:c], n), "b": [], "c": [], "d": [], "b_ttft": [], "c_ttft": []}
        for _ in range(opts.repeats):  # alternating, so drifts in machine load hit all three alike
            b, b_ttft = engine_run(engine, encoded[:c], n)
            cc, c_ttft = serve_run(url, serving.model_name, QUESTIONS[:c], n)
            r["b"].append(b)
            r["c"].append(cc)
            r["d"].append(static(model, tokenizer, prompts[:c], n))
            r["b_ttft"] += b_ttft
            r["c_ttft"] += c_ttft
        for key in "bcd":
            r[key] = statistics.median(r[key])
    engine.shutdown()
    ray.shutdown()

    print(f"\n{opts.model}, {n} new tokens per request, {opts.threads} torch threads, median of {opts.repeats} (tokens/s)")
    print(f"{'conc':>4} {'(a)naive':>9} {'(b)engine':>10} {'(c)serve':>9} {'(d)static':>10} "
          f"{'b/a':>6} {'b/d':>6} {'c/b':>6}  {'TTFT b p50/p95 s':>17}  {'TTFT c p50/p95 s':>17}")
    for c, r in rows.items():
        print(f"{c:>4} {r['a']:>9.1f} {r['b']:>10.1f} {r['c']:>9.1f} {r['d']:>10.1f} "
              f"{r['b'] / r['a']:>6.2f} {r['b'] / r['d']:>6.2f} {r['c'] / r['b']:>6.2f}  "
              f"{statistics.median(r['b_ttft']):>8.2f}/{pct(r['b_ttft'], 0.95):<8.2f}  "
              f"{statistics.median(r['c_ttft']):>8.2f}/{pct(r['c_ttft'], 0.95):<8.2f}")
    top = rows[max(levels)]
    print(f"targets: (b)/(d) >= 1 at concurrency {max(levels)}: {top['b'] / top['d']:.2f}; "
          f"(c)/(b) >= 0.9: {min(r['c'] / r['b'] for r in rows.values()):.2f} (lowest level)")


if __name__ == "__main__":
    main()
