"""`meddistill eval --model SOURCE --dataset REF`: one model on medical QA, with a report."""

from __future__ import annotations

import argparse
import sys


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "eval",
        help=summary,
        description="Evaluate a model on a medical QA dataset with batched greedy generation: accuracy "
        "with a Wilson 95%% CI, per question type, unparsed-answer rate (counted wrong), token F1 "
        "for open questions, latency, tokens/s and peak memory. Writes eval.json and eval.md "
        "to --out.",
        epilog="example (2 CPU cores, a few minutes):\n"
        "  meddistill eval --model builtin:smollm2-135m-instruct \\\n"
        "      --dataset pubmedqa:@samples/pubmedqa/ori_pqal.json#test --limit 50\n"
        "model sources: builtin:NAME | /local/dir | file.gguf | s3://bucket/prefix | org/name (HF cache)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="SOURCE", help="model source (see below)")
    p.add_argument("--dataset", required=True, metavar="REF", help="dataset reference FORMAT:PATH[#SPLIT]")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N records")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="generation batch size (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="default 32")
    p.add_argument("--style", choices=("plain", "r1"), default="plain",
                   help="plain: answer directly; r1: <think> reasoning then the final line")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="report folder (default runs/eval)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--lenient", action="store_true", help="skip malformed records (reported) instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from meddistill.data import DataFormatError, DatasetRefError, load_dataset
    from meddistill.evaluation import evaluate, write_report
    from meddistill.modelsource import ModelSourceError, load_model

    try:
        ds = load_dataset(args.dataset, lenient=args.lenient, limit=args.limit)
    except (DatasetRefError, DataFormatError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if ds.skipped:
        print(f"warning: skipped {len(ds.skipped)} malformed records (first: {ds.skipped[0].location}: "
              f"{ds.skipped[0].reason})", file=sys.stderr)
    if not ds.records:
        print(f"error: dataset {ds.ref} has no records", file=sys.stderr)
        return 1
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    except ModelSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    result = evaluate(
        model, tokenizer, ds.records, style=args.style, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
        model_name=args.model, dataset_name=str(ds.ref),
    )
    json_path, md_path = write_report(result, args.out)
    acc = "n/a" if result.accuracy is None else f"{100 * result.accuracy:.1f}%"
    ci = "" if result.ci_low is None else f" (95% CI {100 * result.ci_low:.1f}-{100 * result.ci_high:.1f}%)"
    print(f"accuracy {acc}{ci} on {result.n_scored} scored questions; unparsed {result.unparsed}; "
          f"open questions {result.open_n}" + (f" (token F1 {result.open_f1:.3f})" if result.open_n else ""))
    print(f"wall {result.wall_s:.1f} s, {result.seconds_per_question:.2f} s/question, "
          f"{result.tokens_per_s:.1f} tokens/s, peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB")
    print(f"report: {json_path} {md_path}")
    return 0
