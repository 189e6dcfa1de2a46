"""`meddistill serve JOB.yaml | --model SOURCE`: the OpenAI-compatible endpoint on a local Ray Serve."""

from __future__ import annotations

import sys


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "serve",
        help=summary,
        description="Serve a job's quantized student (runs/<job>/quantize) with the job's serving settings, or "
        "any model source with --model. Prints the URL and example curl/openai calls; Ctrl-C stops it.",
        epilog="examples:\n  meddistill serve examples/quickstart.yaml\n"
        "  meddistill serve --model builtin:smollm2-135m-instruct --port 8001",
    )
    p.add_argument("job", nargs="?", metavar="JOB.yaml", help="MedDistillJob file")
    p.add_argument("--model", metavar="SOURCE", help="model source to serve instead of the job's quantized student")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--print-serve-config", action="store_true",
                   help="print the RayService serveConfigV2 for the job and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.job and not args.model:
        print("error: give a JOB.yaml or --model SOURCE (e.g. --model builtin:smollm2-135m-instruct)", file=sys.stderr)
        return 2
    job = None
    if args.job:
        from meddistill.spec.load import SpecValidationError, load_job

        try:
            job = load_job(args.job)
        except SpecValidationError as err:
            for e in err.errors:
                print(f"error: {e}", file=sys.stderr)
            return 1
    if args.print_serve_config:
        if job is None:
            print("error: --print-serve-config needs a JOB.yaml", file=sys.stderr)
            return 2
        from meddistill.serve.config import render_serve_config_v2

        print(render_serve_config_v2(job, args.model))
        return 0
    from meddistill.serve.local import serve_job, serve_model

    try:
        if job is not None:
            serve_job(job, model=args.model, host=args.host, port=args.port)
        else:
            serve_model(args.model, host=args.host, port=args.port)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
