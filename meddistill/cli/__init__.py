"""`meddistill`: the command line. One module per command; each adds itself with `register()`.

Command modules import heavy libraries (torch, ray) inside their handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Before torch loads libgomp (which reads it once), and inherited by the Ray this command starts: OpenMP
# threads that finished their share otherwise spin 300,000 rounds before they sleep. On 2 cores with two
# torch processes at work (a training worker and an evaluation, a served replica and a client) each then
# spins on the core the other needs: two batch-1 generators of SmolLM2-135M ran at 670 ms/token each by
# default, 143 at 10,000 rounds (53 alone). A value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from meddistill import __version__  # noqa: E402

# (module, one-line summary) in the order a newcomer meets them.
COMMANDS = [
    ("validate_cmd", "check MedDistillJob files; every error names the field and the fix"),
    ("run_cmd", "run a MedDistillJob's whole pipeline on a local (or given) Ray cluster"),
    ("data_cmd", "load a dataset reference and show counts, question types and a normalized record"),
    ("eval_cmd", "evaluate one model on medical QA: accuracy with 95% CI, latency, memory"),
    ("card_cmd", "print a job's model card: data, settings, results and lineage from its manifests"),
    ("verify_cmd", "re-hash a job's artifacts and lineage; exit 1 naming any file that does not match"),
    ("serve_cmd", "serve a job's quantized student (or any model) with an OpenAI-compatible API"),
    ("crd_cmd", "print the MedDistillJob CustomResourceDefinition generated from the typed spec"),
    ("operator_cmd", "run the Kubernetes operator (kopf) that drives MedDistillJobs"),
]

EPILOG = """\
quickstart (2 CPU cores, ~15 min, no GPU, no hub):
  meddistill validate examples/quickstart.yaml
  meddistill run examples/quickstart.yaml          # teacher -> distill -> quantize -> evaluate, then serves it
  meddistill serve examples/quickstart.yaml        # serve a finished job again (run --no-serve skips serving)

dataset references (FORMAT:PATH[#SPLIT]) work everywhere:
  pubmedqa:@samples/pubmedqa/ori_pqal.json#test   medqa:questions.jsonl   hf:NAME#split

`meddistill COMMAND --help` explains each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddistill",
        description="Fine-tune, distill, quantize, evaluate and serve medical LLMs on Ray and Kubernetes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"meddistill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, summary in COMMANDS:
        module = importlib.import_module(f"meddistill.cli.{module_name}")
        module.register(subparsers, summary.replace("%", "%%"))  # argparse %-formats help text
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
