"""`meddistill run FILE`: the whole pipeline on a local (or given) Ray cluster, resumable.

Stages run in order through `meddistill.jobs.stage.run_stage`, the same function the operator's
`python -m meddistill.jobs STAGE` calls. A stage whose artifact verifies (manifest digests) and
whose fingerprint matches (its spec sections and its inputs' digests, jobs/stage.py DEPENDS_ON)
is skipped, so re-running after a crash resumes and a changed setting re-runs what it affects.
Ray's log stream goes to <artifacts>/<job>/logs/run-<time>.log unless --verbose. artifacts.uri
resolves against the current directory (like make/kubectl); dataset paths against the spec
file's folder.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "run", help=summary, description=__doc__,
        epilog="examples:\n  meddistill run examples/quickstart.yaml --no-serve\n"
        "  meddistill run examples/quickstart.yaml --stage teacher --force",
    )
    p.add_argument("file", metavar="FILE", help="a MedDistillJob YAML file")
    p.add_argument("--stage", default=None, help="run only this stage (teacher, distill-data, distill, quantize, evaluate)")
    p.add_argument("--no-serve", action="store_true", help="do not serve the quantized student afterwards")
    p.add_argument("--port", type=int, default=8000, help="port of the OpenAI-compatible endpoint served afterwards")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: a running one, else a local one)")
    p.add_argument("--force", action="store_true", help="re-run stages even if their artifacts verify and match the spec")
    p.add_argument("-v", "--verbose", dest="run_verbose", action="store_true",
                   help="show Ray's log stream (workers, Ray Train) on the terminal; it always goes to the run's log file")
    p.set_defaults(func=run)


def _prepare(path: str):
    from meddistill.artifacts import local_path
    from meddistill.jobs.stage import StageContext
    from meddistill.spec.load import load_job

    job = load_job(path)
    local = local_path(job.spec.artifacts.uri)
    if local is not None and "://" not in job.spec.artifacts.uri:
        # Absolute before anything is shipped to Ray workers, whose working directory differs.
        job.spec.artifacts.uri = str(local)
    return StageContext(job, Path(path).resolve().parent)


def _llamacpp_refusal(spec) -> str:
    """Before any stage: a job that makes the gguf format (or serves with llama.cpp) on a machine whose
    llama.cpp build cannot run here is refused now, with the reason, not after the quantize stage."""
    from meddistill.llamacpp_check import LlamaCppUnusable, require_llamacpp
    from meddistill.quantized_formats import FormatError, resolve_formats

    try:
        if "gguf" in resolve_formats(spec) or spec.serving.engine == "llamacpp":
            require_llamacpp("quantization.formats gguf")  # what the quantize stage would raise
    except FormatError:
        return ""  # the stages report it with the field's name
    except LlamaCppUnusable as err:
        return str(err)
    return ""


def run(args) -> int:
    from rich.console import Console
    from rich.traceback import Traceback

    from meddistill.artifacts import PROGRESS, ArtifactStore, stage_uri
    from meddistill.cli.run_logs import note_ray_session, route_logs
    from meddistill.cli.run_progress import StageBars
    from meddistill.jobs.stage import StageError, check_existing, connect_ray, run_stage
    from meddistill.spec.load import SpecValidationError
    from meddistill.spec.models import pipeline_stages

    console = Console(stderr=True)
    verbose = args.verbose or getattr(args, "run_verbose", False)
    try:
        ctx = _prepare(args.file)
    except SpecValidationError as err:
        for e in err.errors:
            console.print(f"[red]error:[/] {e}")
        return 1
    refusal = _llamacpp_refusal(ctx.spec)
    if refusal:
        console.print(f"[red]error:[/] {refusal}", markup=True, highlight=False)
        return 1
    stages = pipeline_stages(ctx.spec)
    if args.stage:
        if args.stage not in stages:
            console.print(f"[red]error:[/] --stage {args.stage!r}: this job's stages are {', '.join(stages)}")
            return 2
        stages = [args.stage]

    log_file = route_logs(ArtifactStore(stage_uri(ctx.spec.artifacts.uri, ctx.name, "logs")).working_dir(), console, verbose)
    console.print(f"logs: {log_file}" + ("" if verbose else "   (--verbose shows Ray's log stream here)"))
    results, started, failure = [], time.time(), None
    with StageBars(console, stages) as bars:
        for stage in stages:
            done, why = (None, "--force") if args.force else check_existing(ctx, stage)
            if done is not None:
                bars.skipped(stage, f"skipped: artifact verifies ({done.digest[:12]})")
                console.print(f"skip {stage}: artifact verifies and matches the spec, digest {done.digest[:12]}")
                results.append(done)
                continue
            if why != "no artifact yet":
                console.print(f"re-running {stage}: {why}")
            bars.running(stage, ctx.output_dir(stage) / PROGRESS, time.time())
            try:
                connect_ray(args.ray_address, log_to_driver=verbose)  # before run_stage's own call: quiet unless verbose
                note_ray_session()
                result = run_stage(ctx, stage, args.ray_address)
            except Exception as err:  # noqa: BLE001 - reported below, once the bars are closed
                bars.finished(stage, "[red]failed", ok=False)
                # INFO: the file only (the terminal gets the short form below)
                logging.getLogger(__name__).info("stage %s failed", stage, exc_info=True)
                failure = (stage, err)
                break
            bars.finished(stage, f"done in {result.wall_s:.0f}s ({result.digest[:12]})")
            results.append(result)
    if failure is not None:
        stage, err = failure
        if isinstance(err, StageError):
            console.print(f"[red]error:[/] stage {stage}: {err}")
        else:
            if verbose:
                console.print(Traceback.from_exception(type(err), err, err.__traceback__))
            console.print(f"[red]error:[/] stage {stage} failed: {type(err).__name__}")
            console.print(tail(str(err), 20), markup=False, highlight=False)  # Ray puts the worker's traceback here
        console.print(f"details: {log_file}")
        return 1
    print_summary(ctx, results, time.time() - started)
    if ctx.spec.serving.enabled and not args.no_serve and not args.stage:
        return serve(ctx, args.port)
    return 0


def tail(text: str, lines: int) -> str:
    """The last lines of an error (Ray puts the worker's traceback in the raised error's text)."""
    parts = text.rstrip().splitlines()
    return "\n".join((["..."] if len(parts) > lines else []) + parts[-lines:])


def print_summary(ctx, results, wall: float) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    from meddistill.artifacts import local_path

    console = Console()
    table = Table(title=f"MedDistillJob {ctx.name}: stages ({wall:.0f}s total)")
    for col in ("stage", "status", "wall s", "digest", "artifact"):
        table.add_column(col)
    for r in results:
        table.add_row(r.stage, "skipped (verified)" if r.skipped else "ran", f"{r.metrics.get('wall_s', 0):.0f}", r.digest[:12], r.artifact_uri)
    console.print(table)
    path = local_path(ctx.uri("evaluate"))
    if path is None or not (path / "results.json").is_file():
        return
    from meddistill.jobs.results_table import (
        COMPARISON_COLUMNS, OPEN_COLUMNS, ROW_COLUMNS, comparison_cells, excluded_lines, open_cells, open_rows,
        paper_line, row_cells, teacher_line,
    )
    from meddistill.spec.models import Results

    res = Results.model_validate(json.loads((path / "results.json").read_text()))

    def table(title: str, columns, rows) -> None:
        if rows:
            t = Table(title=title)
            for col in columns:
                t.add_column(col)
            for row in rows:
                t.add_row(*row)
            console.print(t)

    table("results (the paper's table)", ROW_COLUMNS, [row_cells(r) for r in res.rows])
    table("open questions (free-text answers)", OPEN_COLUMNS, [open_cells(r) for r in open_rows(res)])
    table("paired comparisons (same questions)", COMPARISON_COLUMNS, [comparison_cells(c) for c in res.comparisons])
    card = (f"model card: {path / 'README.md'}   (meddistill card {path.parent}; meddistill verify {path.parent})"
            if (path / "README.md").is_file() else "")
    for line in [paper_line(res), teacher_line(res), *excluded_lines(res), f"report: {path}", card]:
        if line:
            console.print(line, markup=False, highlight=False)


def serve(ctx, port: int = 8000) -> int:
    try:
        from meddistill.serve.local import serve_job
    except ImportError as err:
        print(f"serving is not available ({err}); the quantized student is at {ctx.uri('quantize')}", file=sys.stderr)
        return 0
    serve_job(ctx.job, base_dir=str(ctx.base_dir), port=port)
    return 0
