"""`meddistill verify JOB_DIR`: re-hash a job's artifacts and the lineage between them (meddistill/lineage.py)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "verify",
        help=summary,
        description="Re-hash every stage's files against its manifest, check each manifest's recorded input "
        "digests against the upstream manifests, and re-hash the datasets and base model the model card "
        "recorded where they are on this machine. One line per stage; exit code 1 on any mismatch, "
        "naming the file.",
        epilog="example:\n  meddistill verify runs/quickstart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job_dir", metavar="JOB_DIR", help="a job's artifact folder: <spec.artifacts.uri>/<job name>")
    p.set_defaults(func=run)


def run(args) -> int:
    from meddistill.lineage import verify_job

    try:
        checks = verify_job(args.job_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not checks:
        print(f"error: {args.job_dir}: no stage folders (teacher, distill, ...); is it <artifacts uri>/<job name>?",
              file=sys.stderr)
        return 2
    for check in checks:
        print(check.line())
    failed = [c.stage for c in checks if not c.ok]
    print(f"lineage: {'does NOT verify: ' + ', '.join(failed) if failed else 'verified'}")
    return 1 if failed else 0
