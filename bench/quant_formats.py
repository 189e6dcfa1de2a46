"""The gguf format against the 16-bit student and today's engine, side by side in one run (issue 13).

Input: a finished run's artifact folder (distill/ and quantize/, e.g. runs/quickstart). The bench
makes the GGUF from the merged student itself (jobs/quantize_gguf.build_gguf, --gguf-type) and measures
  (1) accuracy on PubMedQA test (the evaluation harness, same prompts and scoring for both rows, paired
      McNemar + bootstrap): the 16-bit student under transformers (bf16 where the CPU has it, as
      the evaluate stage) vs the GGUF student under llama.cpp;
  (2) batch-1 latency per question and decode ms per token on the first --latency-questions prompts
      (the harness's batch-1 pass, the same for both);
  (3) output tokens/s at --concurrency through the Serve endpoint (HTTP, streaming, ignore_eos,
      --new-tokens each): today's transformers engine serving the quantize artifact (nf4) vs the
      llama.cpp engine serving the GGUF, each replica with --threads threads.
Targets: gguf batch-1 latency <= 0.25 x the 16-bit student's; tokens/s >= 3 x today's engine;
accuracy not significantly below the student's (p >= 0.05 or better) and >= 97 % of it.

    python bench/quant_formats.py RUN_DIR [--limit 40] [--gguf-type Q4_K_M] [--threads 2] [--out /tmp/qf]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from serve_throughput import EVENTS, QUESTIONS, serve_run  # bench/ is sys.path[0] when run as a script

PUBMEDQA = "pubmedqa:@samples/pubmedqa/ori_pqal.json#test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_row(kind: str, source: Path, records, opts) -> dict:
    """One model through the evaluation harness, as the evaluate stage runs it (evaluate_model)."""
    from meddistill.evaluation import evaluate
    from meddistill.evaluation.llamacpp import load_gguf_for_eval
    from meddistill.jobs.evaluate import load_for_eval

    if kind == "gguf":
        model, tokenizer, dtype = load_gguf_for_eval(source, opts.batch_size, threads=opts.threads)
    else:
        model, tokenizer, dtype = load_for_eval(kind, str(source), "none")
    result = evaluate(model, tokenizer, records, batch_size=opts.batch_size, max_new_tokens=opts.max_new_tokens,
                      latency_questions=opts.latency_questions, progress=False, model_name=kind, dataset_name=PUBMEDQA)
    row = result.to_dict(include_questions=False)
    row.update(dtype=dtype, correct_by_id={q.id: q.correct for q in result.questions if q.correct is not None})
    del model
    return row


def throughput(engine: str, model_source: str, extra: dict, opts) -> float:
    """Median output tokens/s of --repeats rounds of --concurrency streamed chats through Serve."""
    import statistics

    from ray import serve

    from meddistill.serve.config import serving_args
    from meddistill.serve.local import start
    from meddistill.spec.models import Serving

    c = opts.concurrency
    serving = Serving(max_batch_size=c, max_ongoing_requests=c, target_ongoing_requests=c,
                      cpus_per_replica=opts.threads, min_replicas=1, max_replicas=1, engine=engine,
                      stream_interval=opts.stream_interval)
    args = {**serving_args(serving, model_source, engine=engine), **extra}
    url = start(args, port=opts.port, name=f"bench-{engine}")  # one Serve, one HTTP port for both engines
    questions = (QUESTIONS * (c // len(QUESTIONS) + 1))[:c]
    serve_run(url, serving.model_name, questions[:2], 4)  # warm-up
    EVENTS[0] = 0
    rates = [serve_run(url, serving.model_name, questions, opts.new_tokens)[0] for _ in range(opts.repeats)]
    serve.delete(f"bench-{engine}")
    tokens = opts.repeats * c * opts.new_tokens
    print(f"  {engine}: {', '.join(f'{r:.1f}' for r in rates)} tok/s; {tokens / max(EVENTS[0], 1):.2f} tokens per SSE event",
          flush=True)
    return statistics.median(rates)


def serve_rates(quantize_dir: Path, gguf_dir: Path, gguf_file: Path, opts) -> dict[str, float]:
    """Tokens/s through Serve: today's transformers engine (nf4 artifact), then llama.cpp (gguf)."""
    import ray

    os.environ["RAY_worker_niceness"] = "0"  # as serve_throughput: replicas compete on equal terms
    ray.init(address="local", num_cpus=opts.threads + 1, include_dashboard=False, log_to_driver=False)  # never attach to a running head
    print(f"throughput at concurrency {opts.concurrency}: transformers engine (nf4 artifact), then llama.cpp (gguf) ...",
          flush=True)
    rates = {"transformers": throughput("transformers", str(quantize_dir), {}, opts)}
    # The GGUF's folder holds its tokenizer and config (build_gguf copies them), as the quantize artifact does.
    rates["llamacpp"] = throughput("llamacpp", str(gguf_dir), {"formats": ["gguf"], "gguf_file": gguf_file.name}, opts)
    ray.shutdown()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run's artifact folder (distill/, quantize/)")
    parser.add_argument("--limit", type=int, default=40, help="PubMedQA test questions (0 = all 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf-type", default="Q4_K_M", choices=["Q4_K_M", "Q4_0", "Q8_0"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="as the quickstart's evaluation.maxNewTokens")
    parser.add_argument("--latency-questions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="serving.streamInterval of both engines (tokens per streamed chunk after the first)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/quant_formats"))
    parser.add_argument("--skip-serve", action="store_true", help="accuracy and batch-1 latency only")
    parser.add_argument("--serve-only", action="store_true", help="tokens/s through Serve only (no accuracy or latency rows)")
    opts = parser.parse_args()
    opts.port = free_port()

    import torch

    torch.set_num_threads(opts.threads)
    from meddistill.data import load_dataset
    from meddistill.evaluation import sample_records
    from meddistill.jobs.quantize import merge_student
    from meddistill.jobs.quantize_gguf import build_gguf
    from meddistill.jobs.results_table import compare
    from meddistill.evaluation.stats import paired_bootstrap

    adapter, quantize_dir = opts.run_dir / "distill" / "adapter", opts.run_dir / "quantize"
    opts.out.mkdir(parents=True, exist_ok=True)
    merged_dir, gguf_dir = opts.out / "merged", opts.out / "gguf"
    gguf_file = gguf_dir / f"model-{opts.gguf_type}.gguf"
    if not gguf_file.is_file():
        started = time.perf_counter()
        merged, tokenizer = merge_student(adapter)
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        del merged
        made = build_gguf(merged_dir, gguf_dir, opts.gguf_type)
        print(f"gguf made in {time.perf_counter() - started:.0f} s: {made}", flush=True)

    if opts.serve_only:
        rates = serve_rates(quantize_dir, gguf_dir, gguf_file, opts)
        print(f"tokens/s at concurrency {opts.concurrency} through Serve: {rates}; llama.cpp / transformers "
              f"{rates['llamacpp'] / rates['transformers']:.2f} x (target >= 3)")
        return

    records = sample_records(load_dataset(PUBMEDQA).records, opts.limit or None, seed=opts.seed)
    print(f"evaluating {len(records)} PubMedQA test questions: student (transformers), then gguf (llama.cpp) ...", flush=True)
    rows = {"student": evaluate_row("student", adapter, records, opts), "gguf": evaluate_row("gguf", gguf_file, records, opts)}
    (opts.out / "rows.json").write_text(json.dumps(rows, indent=2, default=str))
    s, g = rows["student"], rows["gguf"]
    paired = compare("student", "gguf", s, g, seed=opts.seed)
    s_ok = [s["correct_by_id"][i] for i in sorted(s["correct_by_id"])]
    g_ok = [g["correct_by_id"][i] for i in sorted(s["correct_by_id"])]
    boot = paired_bootstrap(s_ok, g_ok, seed=opts.seed)

    rates = {} if opts.skip_serve else serve_rates(quantize_dir, gguf_dir, gguf_file, opts)

    print(f"\n{opts.run_dir}: {len(records)} PubMedQA test questions, {opts.threads} threads")
    print(f"{'model':<10} {'dtype':<26} {'accuracy':>9} {'weights MB':>11} {'b1 s/q':>8} {'ms/token':>9} {'tok/s@batch':>12}")
    for kind, r in rows.items():
        print(f"{kind:<10} {r['dtype']:<26} {100 * r['accuracy']:>8.1f}% {r['weight_bytes'] / 2**20:>11.1f} "
              f"{r['latency_b1_s']:>8.3f} {r['ms_per_token_b1'] or float('nan'):>9.1f} {r['tokens_per_s']:>12.1f}")
    latency = g["latency_b1_s"] / s["latency_b1_s"]
    retention = boot.ratio
    print(f"\nbatch-1 latency gguf / student: {latency:.3f} x (target <= 0.25): {'met' if latency <= 0.25 else 'NOT met'}")
    print(f"decode ms/token gguf / student: {(g['ms_per_token_b1'] or 0) / (s['ms_per_token_b1'] or 1):.3f} x")
    if rates:
        ratio = rates["llamacpp"] / rates["transformers"]
        print(f"tokens/s at concurrency {opts.concurrency} through Serve: transformers (nf4) {rates['transformers']:.1f}, "
              f"llama.cpp (gguf) {rates['llamacpp']:.1f}: {ratio:.2f} x (target >= 3): {'met' if ratio >= 3 else 'NOT met'}")
    if paired is not None:
        print(f"accuracy gguf - student: {paired.delta_pct_points:+.1f} points (95% CI {paired.ci_low:+.1f} to "
              f"{paired.ci_high:+.1f}), McNemar p={paired.p_value:.3g} ({paired.verdict})")
    if retention is not None:
        print(f"accuracy retention: {100 * retention:.1f} % (95% CI {100 * boot.ratio_low:.1f}-{100 * boot.ratio_high:.1f}; "
              f"target >= 97 %): {'met' if retention >= 0.97 else 'NOT met'}; not significantly below: "
              f"{'met' if paired is None or paired.delta_pct_points >= 0 or paired.p_value >= 0.05 else 'NOT met'}")
    (opts.out / "summary.json").write_text(json.dumps({"rows": {k: {x: v for x, v in r.items() if x != "correct_by_id"}
                                                                for k, r in rows.items()}, "serve_tokens_per_s": rates,
                                                       "latency_ratio": latency, "retention": retention,
                                                       "paired": paired.model_dump() if paired else None}, indent=2, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
