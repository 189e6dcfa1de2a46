"""`meddistill data REF`: load a dataset reference and show what the pipeline would see."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "data",
        help=summary,
        description="Load a dataset reference FORMAT:PATH[#SPLIT] and print the record count, the "
        "question-type breakdown, skipped records with their reasons (--lenient) and the first "
        "records normalized as JSON. Exit code 1 when the data cannot be loaded.",
        epilog="examples:\n  meddistill data pubmedqa:@samples/pubmedqa/ori_pqal.json#test\n"
        "  meddistill data medquad:@samples/medquad --show 2\n  meddistill data medqa:broken.jsonl --lenient",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ref", metavar="REF", help="FORMAT:PATH[#SPLIT]; formats: pubmedqa, medqa, medmcqa, mmlu, "
                   "medquad, instruction, jsonl, hf")
    p.add_argument("--lenient", action="store_true", help="skip malformed records (reported) instead of failing")
    p.add_argument("--show", type=int, default=1, metavar="N", help="print the first N records (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    from meddistill.data import DataFormatError, DatasetRefError, load_dataset

    try:
        ds = load_dataset(args.ref, lenient=args.lenient)
    except (DatasetRefError, DataFormatError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, DataFormatError) and not args.lenient and not str(err).startswith("dataset "):
            print("hint: --lenient skips malformed records and reports them", file=sys.stderr)
        return 1
    print(f"dataset: {ds.ref}")
    print(f"records: {len(ds)}")
    for qtype, n in ds.question_type_counts().items():
        print(f"  {qtype}: {n}")
    answers = Counter(r.answer for r in ds.records if r.is_scored_by_choice)
    if answers:
        print("answer labels: " + ", ".join(f"{k}={v}" for k, v in sorted(answers.items())))
    print(f"skipped: {len(ds.skipped)}")
    for reason, n in Counter(s.reason for s in ds.skipped).most_common(5):
        first = next(s.location for s in ds.skipped if s.reason == reason)
        print(f"  {n} x {reason} (first at {first})")
    for record in ds.records[: max(args.show, 0)]:
        print(json.dumps(record.to_dict(), indent=2, ensure_ascii=False))
    return 0
