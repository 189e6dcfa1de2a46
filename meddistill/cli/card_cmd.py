"""`meddistill card JOB_DIR`: print a job's model card (written by its evaluate stage)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "card",
        help=summary,
        description="Print the model card the evaluate stage wrote (README.md, Hugging Face layout) or, with "
        "--json, model_card.json. `meddistill verify JOB_DIR` checks the lineage it records.",
        epilog="example:\n  meddistill card runs/quickstart\n  meddistill card runs/quickstart --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job_dir", metavar="JOB_DIR", help="a job's artifact folder: <spec.artifacts.uri>/<job name>")
    p.add_argument("--json", action="store_true", help="print model_card.json instead of the markdown")
    p.set_defaults(func=run)


def run(args) -> int:
    from meddistill.artifacts import MANIFEST, sha256_file
    from meddistill.jobs.model_card import CARD_MD
    from meddistill.lineage import CARD_JSON, CARD_STAGE

    path = Path(args.job_dir) / CARD_STAGE / (CARD_JSON if args.json else CARD_MD)
    if not path.is_file():
        print(f"error: {path} does not exist; the evaluate stage writes the card: "
              f"meddistill run FILE --stage evaluate", file=sys.stderr)
        return 1
    sys.stdout.write(path.read_text())
    manifest = path.parent / MANIFEST
    if not args.json and manifest.is_file():  # the card cannot hold the digest of the manifest that covers it
        print(f"\nThis card is covered by {CARD_STAGE}/{MANIFEST}, sha256 {sha256_file(manifest)}; "
              f"`meddistill verify {args.job_dir}` re-hashes the chain.")
    return 0
