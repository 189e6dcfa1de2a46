"""`meddistill validate FILE...`: check MedDistillJob files against the typed spec."""

from __future__ import annotations

import sys


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "validate",
        help=summary,
        description="Validate MedDistillJob YAML files (several documents per file allowed). Each error "
        "names the field path, the value given and what is allowed. Exit code 1 on any error.",
        epilog="example: meddistill validate examples/*.yaml",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    from meddistill.spec.load import SpecValidationError, load_job_documents, validate_document

    n_ok = n_bad = 0
    for path in args.files:
        try:
            docs = load_job_documents(path)
        except SpecValidationError as e:
            for err in e.errors:
                print(f"error: {err}", file=sys.stderr)
            n_bad += 1
            continue
        for source, doc in docs:
            job, errors = validate_document(doc, source)
            if errors:
                n_bad += 1
                for err in errors:
                    print(f"error: {err}", file=sys.stderr)
            else:
                n_ok += 1
                print(f"ok: {source}: MedDistillJob {job.metadata.name}")
    print(f"{n_ok} valid, {n_bad} invalid", file=sys.stderr if n_bad else sys.stdout)
    return 1 if n_bad else 0
