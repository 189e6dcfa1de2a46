"""Recipe: the paper's table — teacher, student and quantized student on medical QA.

Each model is evaluated by meddistill.evaluation.evaluate in its own Ray task with a fresh
worker process (max_calls=1), so its peak memory is its own and not the maximum of everything
the process loaded before; the tasks run one after another so their latencies are comparable. Outputs in the artifact directory:
  results.json   spec Results (by alias): per model x dataset rows (accuracy, Wilson 95% CI,
                 weight bytes, peak memory, latency, tokens/s) and the relative figures of the
                 quantized student vs the teacher (memory -x %, latency -y %, accuracy retention %)
  results.md     the same table for people;  eval.md  per-model detail reports
  results.png    accuracy (with CI), weight memory and latency side by side
  <model>/<dataset>/eval.json   every question, prediction and reason
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from meddistill.jobs.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


def evaluate_model(kind: str, source: str, refs: list[str], base_dir: str | None, settings: dict, out_dir: str) -> list[dict]:
    """One Ray task: load one model, evaluate it on every dataset, write its detail reports."""
    from meddistill.data import load_dataset
    from meddistill.evaluation import evaluate, write_report
    from meddistill.modelsource import load_model

    if kind == "student":
        from meddistill.jobs.quantize import merge_student

        model, tokenizer = merge_student(Path(source))
    else:
        model, tokenizer = load_model(source, dtype="float32")
    results = []
    for ref in refs:
        records = load_dataset(ref, base_dir=base_dir, limit=settings["limit"] or None).records
        result = evaluate(
            model, tokenizer, records, style=settings["prompt_style"], batch_size=settings["batch_size"],
            max_new_tokens=settings["max_new_tokens"], progress=False, model_name=kind, dataset_name=ref,
        )
        write_report(result, Path(out_dir) / kind / re.sub(r"[^A-Za-z0-9._-]+", "_", ref).strip("_"))
        results.append(result.to_dict(include_questions=False))
    return results


def result_row(kind: str, r: dict):
    from meddistill.spec.models import ResultRow

    return ResultRow(
        model=kind, dataset=r["dataset"], accuracy=r["accuracy"] or 0.0, ci_low=r["ci_low"] or 0.0,
        ci_high=r["ci_high"] or 0.0, n=r["n"], unparsed_rate=r["unparsed_rate"] or 0.0,
        weight_bytes=r["weight_bytes"], peak_memory_bytes=r["peak_cuda_bytes"] or r["peak_rss_bytes"],
        latency_ms=1000 * r["seconds_per_question"], tokens_per_second=r["tokens_per_s"],
    )


def summarize(rows: list) -> dict:
    """Relative figures of the quantized student vs the teacher (None when either is missing)."""
    def total(kind):
        mine = [r for r in rows if r.model == kind]
        if not mine:
            return None
        n = sum(r.n for r in mine) or 1
        return {
            "accuracy": sum(r.accuracy * r.n for r in mine) / n,
            "weight_bytes": mine[0].weight_bytes,
            "latency_ms": sum(r.latency_ms * r.n for r in mine) / n,
        }

    teacher, quantized = total("teacher"), total("quantized")
    if not teacher or not quantized:
        return {}
    return {
        "memory_reduction_pct": round(100 * (1 - quantized["weight_bytes"] / teacher["weight_bytes"]), 2),
        "latency_reduction_pct": round(100 * (1 - quantized["latency_ms"] / teacher["latency_ms"]), 2),
        "accuracy_retention_pct": round(100 * quantized["accuracy"] / teacher["accuracy"], 2) if teacher["accuracy"] else None,
    }


def markdown_table(results) -> str:
    lines = [
        "| model | dataset | accuracy (95% CI) | n | unparsed | weights MB | peak MB | latency ms/q | tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.rows:
        lines.append(
            f"| {r.model} | {r.dataset} | {100 * r.accuracy:.1f}% ({100 * r.ci_low:.1f}–{100 * r.ci_high:.1f}) | {r.n} | "
            f"{100 * r.unparsed_rate:.0f}% | {r.weight_bytes / 2**20:.1f} | {r.peak_memory_bytes / 2**20:.0f} | "
            f"{r.latency_ms:.0f} | {r.tokens_per_second:.1f} |"
        )
    def pct(v):
        return "n/a" if v is None else f"{v:.1f}%"
    lines += [
        "",
        f"Quantized student vs teacher: weight memory -{pct(results.memory_reduction_pct)}, "
        f"latency -{pct(results.latency_reduction_pct)}, accuracy retention {pct(results.accuracy_retention_pct)}.",
    ]
    return "\n".join(lines) + "\n"


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.rows
    labels = [f"{r.model}\n{r.dataset.split(':')[0]}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    acc = [100 * r.accuracy for r in rows]
    # max(0, .): the Wilson bounds can sit a rounding error past the point estimate at 0% or 100%
    err = [[max(0.0, 100 * (r.accuracy - r.ci_low)) for r in rows], [max(0.0, 100 * (r.ci_high - r.accuracy)) for r in rows]]
    axes[0].bar(labels, acc, yerr=err, capsize=4, color="#4c72b0")
    axes[0].set_ylabel("accuracy % (95% CI)")
    axes[1].bar(labels, [r.weight_bytes / 2**20 for r in rows], color="#55a868")
    axes[1].set_ylabel("weights MB")
    axes[2].bar(labels, [r.latency_ms for r in rows], color="#c44e52")
    axes[2].set_ylabel("latency ms / question")
    fig.suptitle("teacher vs student vs quantized student")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(ctx: StageContext, out: Path) -> StageOutput:
    import ray

    from meddistill.spec.models import Results

    spec = ctx.spec
    ev = spec.evaluation
    sources = {
        "teacher": str(ctx.input_dir("teacher") / "model"),
        "student": str(ctx.input_dir("distill") / "adapter"),
        "quantized": str(ctx.input_dir("quantize")),
    }
    settings = {"limit": ev.limit, "batch_size": ev.batch_size, "max_new_tokens": ev.max_new_tokens, "prompt_style": ev.prompt_style}
    resources = spec.teacher.resources  # the largest model decides what a worker needs
    task = ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker, max_calls=1)(evaluate_model)
    base_dir = str(ctx.base_dir) if ctx.base_dir else None
    rows = []
    for kind in ev.models:  # one after another: latencies measured side by side must not share the CPU
        rows += [result_row(kind, r) for r in ray.get(task.remote(kind, sources[kind], ev.datasets, base_dir, settings, str(out)))]
    results = Results(rows=rows, report_uri=ctx.uri("evaluate"), **summarize(rows))
    (out / "results.json").write_text(json.dumps(results.model_dump(by_alias=True), indent=2))
    (out / "results.md").write_text("# MedDistill results\n\n" + markdown_table(results))
    details = sorted(out.glob("*/*/eval.md"))
    (out / "eval.md").write_text("\n\n".join(p.read_text() for p in details))
    plot(results, out / "results.png")
    metrics = {"rows": len(rows), **summarize(rows)}
    return StageOutput(config=ev.model_dump(by_alias=True), metrics=metrics)
