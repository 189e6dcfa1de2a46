"""`python -m meddistill.jobs STAGE`: run one pipeline stage (what the operator submits).

The MedDistillJob arrives as JSON/YAML in the MEDDISTILL_JOB environment variable (RayJob,
Ray Jobs API) or from `--job FILE`. Dataset paths resolve against the file's folder (or
MEDDISTILL_BASE_DIR). The last stdout line is `MEDDISTILL_STAGE_RESULT {"stage", "artifact_uri",
"digest"}`; the exit code is 0 on success and 1 with an `error:` line otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from meddistill.spec.models import STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meddistill.jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--job", metavar="FILE", help="MedDistillJob YAML/JSON (default: $MEDDISTILL_JOB)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: a running one, else local)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from meddistill.jobs.stage import StageContext, load_job_document, run_stage

    if args.job:
        text, base_dir = Path(args.job).read_text(), Path(args.job).resolve().parent
    elif os.environ.get("MEDDISTILL_JOB"):
        text, base_dir = os.environ["MEDDISTILL_JOB"], Path(os.environ.get("MEDDISTILL_BASE_DIR", os.getcwd()))
    else:
        print("error: no job: set MEDDISTILL_JOB to the MedDistillJob JSON or pass --job FILE", file=sys.stderr)
        return 2
    try:
        ctx = StageContext(load_job_document(text), base_dir)
        result = run_stage(ctx, args.stage, args.ray_address)
    except Exception as err:  # noqa: BLE001 - the exit code and one clear line are the contract
        traceback.print_exc()
        print(f"error: stage {args.stage}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(result.result_line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
