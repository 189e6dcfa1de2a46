"""`meddistill eval --model SOURCE --dataset REF`: one model on medical QA, with a report."""

from __future__ import annotations

import argparse
import sys


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "eval",
        help=summary,
        description="Evaluate a model on a medical QA dataset with batched greedy generation and/or "
        "log-likelihood scoring of the options (lm-evaluation-harness's acc / acc_norm): accuracy "
        "with a Wilson 95% CI, per question type, unparsed-answer rate (counted wrong), token F1 "
        "and ROUGE-L for open questions, repetition, keyword hits (records with meta.keywords), "
        "latency at the batch size and at batch 1, tokens/s and peak memory. Writes eval.json and "
        "eval.md to --out (with --scoring both, the log-likelihood report goes to --out/loglik).",
        epilog="example (2 CPU cores, a few minutes):\n"
        "  meddistill eval --model builtin:smollm2-135m-instruct \\\n"
        "      --dataset pubmedqa:@samples/pubmedqa/ori_pqal.json#test --limit 50\n"
        "model sources: builtin:NAME | /local/dir | file.gguf | s3://bucket/prefix | org/name (HF cache)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="SOURCE", help="model source (see below)")
    p.add_argument("--dataset", required=True, metavar="REF", help="dataset reference FORMAT:PATH[#SPLIT]")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="a seeded sample of N records, stratified by gold label (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit sample (default 0)")
    p.add_argument("--scoring", choices=("generative", "loglik", "both"), default="generative",
                   help="generative: extract the answer from generated text; loglik: the option with the "
                   "highest log-likelihood (closed questions only); both: one report each")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="generation batch size (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="closed questions (default 32)")
    p.add_argument("--open-max-new-tokens", type=int, default=96, metavar="N",
                   help="open (free-text) questions (default 96)")
    p.add_argument("--latency-questions", type=int, default=8, metavar="N",
                   help="questions timed again at batch 1 (default 8; 0 skips)")
    p.add_argument("--style", choices=("plain", "r1"), default="plain",
                   help="plain: answer directly; r1: <think> reasoning then the final line")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="report folder (default runs/eval)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--lenient", action="store_true", help="skip malformed records (reported) instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from meddistill.data import DataFormatError, DatasetRefError, load_dataset
    from meddistill.evaluation import evaluate, sample_records, write_report
    from meddistill.modelsource import ModelSourceError, load_model

    try:
        ds = load_dataset(args.dataset, lenient=args.lenient)
        records = sample_records(ds.records, args.limit, seed=args.seed)
    except (DatasetRefError, DataFormatError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if ds.skipped:
        print(f"warning: skipped {len(ds.skipped)} malformed records (first: {ds.skipped[0].location}: "
              f"{ds.skipped[0].reason})", file=sys.stderr)
    if not records:
        print(f"error: dataset {ds.ref} has no records", file=sys.stderr)
        return 1
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    except ModelSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    modes = ("generative", "loglik") if args.scoring == "both" else (args.scoring,)
    for mode in modes:
        out = Path(args.out) / "loglik" if args.scoring == "both" and mode == "loglik" else Path(args.out)
        try:
            result = evaluate(
                model, tokenizer, records, style=args.style, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, open_max_new_tokens=args.open_max_new_tokens,
                scoring=mode, latency_questions=args.latency_questions, progress=not args.no_progress,
                model_name=args.model, dataset_name=str(ds.ref),
            )
        except ValueError as err:  # bad arguments or malformed meta.keywords: named in the message
            print(f"error: {err}", file=sys.stderr)
            return 1
        json_path, md_path = write_report(result, out)
        _print_summary(result)
        print(f"report: {json_path} {md_path}")
    return 0


def _print_summary(r) -> None:
    acc = "n/a" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
    ci = "" if r.ci_low is None else f" (95% CI {100 * r.ci_low:.1f}-{100 * r.ci_high:.1f}%)"
    if r.scoring == "loglik":
        norm = "n/a" if r.acc_norm is None else f"{100 * r.acc_norm:.1f}%"
        print(f"[loglik] acc {acc}{ci}, acc_norm {norm} on {r.n_scored} closed questions")
        print(f"wall {r.wall_s:.1f} s, {r.seconds_per_question:.3f} s/question, peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB")
        return
    print(f"[generative] accuracy {acc}{ci} on {r.n_scored} scored questions; unparsed {r.unparsed} "
          f"(truncated reasoning {r.truncated}); open questions {r.open_n}"
          + (f" (token F1 {r.open_f1:.3f}, ROUGE-L {r.open_rouge_l:.3f})" if r.open_n else ""))
    rep = "n/a" if r.repetition_mean is None else f"{r.repetition_mean:.3f}"
    print(f"repetition: mean repeated 4-gram share {rep}, repetitive answers {r.repetitive_n}/{r.n}"
          + (f"; keyword hits {r.keyword_hits}/{r.keyword_n}" if r.keyword_n else ""))
    b1 = ("" if r.latency_b1_s is None else f"; batch 1: {r.latency_b1_s:.2f} s/question, " +
          ("n/a" if r.ms_per_token_b1 is None else f"{r.ms_per_token_b1:.1f} ms/token"))
    print(f"wall {r.wall_s:.1f} s, batch {r.batch_size}: {r.seconds_per_question:.2f} s/question, "
          f"{r.tokens_per_s:.1f} tokens/s{b1}; peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB")
