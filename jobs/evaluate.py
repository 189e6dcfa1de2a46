"""Recipe: the paper's table — base model, teacher, 16-bit student and quantized student on medical QA.

    sample (seeded, stratified by label) -> exclude questions the training data holds -> for each
    model, in its own Ray task: load -> evaluate every dataset -> rows -> paired comparisons

Rows: `base` is teacher.model before fine-tuning (does fine-tuning help?), `teacher` the fine-tuned
teacher, `student` the merged distilled student in 16 bits (the quantized model's own baseline:
the paper's comparison), `quantized` the 4-bit student. Every model sees the same questions with
the same prompts, so the comparisons are paired by question id (jobs/results_table.py).

Each model is evaluated in its own Ray task with a fresh worker process (max_calls=1), so its peak
memory is its own and not the maximum of everything the process loaded before; the tasks run one
after another so their latencies are comparable. Outputs in the artifact directory:
  results.json   spec Results (by alias): rows, comparisons, exclusions, the paper's comparison
  results.md     the same for people;  eval.md  per-model detail reports
  results.png    accuracy (with CI), weight memory and batch-1 latency side by side
  README.md, model_card.json   the model card (jobs/model_card.py): data, settings, results, lineage
  <model>/<dataset>/eval.json   every question, prediction and reason
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from meddistill.jobs.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


def sixteen_bit_dtype() -> str:
    """The CPU's 16-bit dtype for the student row: bfloat16 where the CPU computes in it, else
    float32 (never float16: its range breaks some checkpoints, and the paper's 16-bit baseline is
    bf16). On a GPU the stage's device decision (jobs/devices.py) picks it.

    oneDNN's bf16 check (AVX-512 BW/VL/DQ or newer) decides: without those instructions bf16
    matmuls take slow fallback kernels, and the latency comparison would flatter the quantized model.
    """
    import torch

    return "bfloat16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def load_for_eval(kind: str, source: str, quantization: str, gpus: int = 0):
    """(model, tokenizer, dtype label) for one row of the table, placed by jobs/devices.py.

    On CPU the quantized student is evaluated exactly as a serving replica loads it (serve/app.py:
    fp32 around the 4-bit weights), so its row describes the model users get. Casting its
    embeddings and norms to bf16 as well (tried) measured something nobody serves: on the
    quickstart it cut the general keyword hits from 20/24 to 12/24. On a GPU every row, the
    replica included, runs in the GPU's 16-bit dtype.
    """
    import torch

    from meddistill.jobs import devices
    from meddistill.modelsource import load_model

    placement = devices.stage_device(f"evaluate {kind}", gpus, devices.checkpoint_weight_bytes(source))
    if kind == "student":
        from meddistill.jobs.quantize import merge_student

        model, tokenizer = merge_student(Path(source), placement)
        if placement.device != "cpu":
            return model, tokenizer, placement.dtype
        sixteen = sixteen_bit_dtype()
        return model.to(getattr(torch, sixteen)), tokenizer, sixteen
    if kind == "w4a16":  # vLLM's 4-bit kernels serve it on GPU; here transformers decompresses it (int4 * scale, exact)
        from transformers import CompressedTensorsConfig

        dtype = placement.dtype if placement.on_gpu else sixteen_bit_dtype()  # as the student row it is paired with
        model, tokenizer = load_model(source, quantization_config=CompressedTensorsConfig(dequantize=True),
                                      **{**placement.load_kwargs(), "dtype": dtype})
        return model, tokenizer, f"w4a16 (decompressed on {'GPU' if placement.on_gpu else 'CPU'}, {dtype})"
    model, tokenizer = load_model(source, **placement.load_kwargs())
    if kind == "quantized" and quantization != "none":
        return model, tokenizer, f"{quantization} + {placement.dtype}"
    return model, tokenizer, placement.dtype


def evaluate_model(kind: str, source: str, datasets: dict[str, list], settings: dict, out_dir: str) -> list[dict]:
    """One Ray task: load one model, evaluate it on every dataset, write its detail reports."""
    from meddistill.evaluation import evaluate, write_report

    if kind == "gguf":  # the llama.cpp format, scored by the same harness (meddistill/evaluation/llamacpp.py)
        from meddistill.evaluation.llamacpp import load_gguf_for_eval

        model, tokenizer, dtype = load_gguf_for_eval(Path(source), settings["batch_size"])
    else:
        model, tokenizer, dtype = load_for_eval(kind, source, settings["quantization"], settings["gpus"])
    results = []
    for ref, records in datasets.items():
        for scoring in settings["scoring"]:
            if scoring == "loglik" and not any(r.is_scored_by_choice for r in records):
                continue  # open questions have no options to score
            name = scoring_label(ref, scoring)
            result = evaluate(
                model, tokenizer, records, style=settings["prompt_style"], batch_size=settings["batch_size"],
                max_new_tokens=settings["max_new_tokens"], scoring=scoring, progress=False, model_name=kind,
                dataset_name=name, latency_questions=settings["latency_questions"],
            )
            write_report(result, Path(out_dir) / kind / re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_"))
            summary = result.to_dict(include_questions=False)
            summary["correct_by_id"] = {q.id: q.correct for q in result.questions if q.correct is not None}
            summary.update(dtype=dtype, ref=ref)
            results.append(summary)
    return results


def evaluate_on_node(out_dir: str, kind: str, source: tuple[str | None, str], datasets: dict[str, list],
                     settings: dict) -> list[dict]:
    """One Ray task on any node (storage.node_task): `source` is (artifact URI, folder in it), fetched
    onto this node, or (None, a model source) for the base model; then evaluate_model into out_dir."""
    from meddistill.jobs import storage

    uri, inside = source
    return evaluate_model(kind, str(storage.fetch_input(uri) / inside) if uri else inside, datasets, settings, out_dir)


def scoring_label(ref: str, scoring: str) -> str:
    """The dataset name a row carries: loglik rows are labelled, so comparisons pair like with like."""
    return ref if scoring == "generative" else f"{ref} [loglik]"


def evaluation_records(ctx: StageContext) -> tuple[dict[str, list], dict[str, list[str]]]:
    """Per dataset: the seeded sample minus the questions training saw, and the ids left out.

    Sampling comes first, so the same seed gives the same questions whatever the training data;
    then exact-question and 13-gram matches against spec.teacher.datasets (what both teacher and
    student train on) are excluded, with the same check that cleans the training data.
    """
    from meddistill.data import decontaminate, load_dataset
    from meddistill.evaluation import sample_records

    spec = ctx.spec
    ev = spec.evaluation
    train = [r for ref in spec.teacher.datasets for r in load_dataset(ref, base_dir=ctx.base_dir).records]
    datasets, excluded = {}, {}
    for ref in ev.datasets:
        records = load_dataset(ref, base_dir=ctx.base_dir).records
        sample = sample_records(records, ev.limit or None, seed=ev.seed)
        # Roles swapped on purpose: here the evaluation records are the ones to drop.
        report = decontaminate(sample, [train])
        for eval_id, train_id, reason in report.removed:
            log.info("evaluation excludes %s from %s (seen in training as %s: %s)", eval_id, ref, train_id, reason)
        if not report.kept:
            raise ValueError(f"evaluation.datasets {ref}: every sampled question occurs in teacher.datasets; evaluate on held-out data")
        datasets[ref] = report.kept
        excluded[ref] = [eval_id for eval_id, _, _ in report.removed]
    return datasets, excluded


def upstream_manifests(ctx: StageContext) -> dict[str, Path]:
    """Every earlier stage's artifact folder, fetched with its manifest (and the teacher's
    decontamination report) only: the model card reads what they recorded, not their weights."""
    from meddistill.artifacts import ArtifactStore
    from meddistill.spec.models import pipeline_stages

    return {stage: ArtifactStore(ctx.uri(stage)).fetch(only=["decontamination.json"])
            for stage in pipeline_stages(ctx.spec) if stage != "evaluate"}


def evaluated_models(spec) -> list[str]:
    """evaluation.models, where `quantized` stands for every format the quantize stage made:
    its nf4 row (`quantized`), its gguf row (`gguf`) and its w4a16 row (`w4a16`)."""
    from meddistill.quantized_formats import requested_formats

    formats = requested_formats(spec)
    kinds = [k for k in spec.evaluation.models if k != "quantized" or "nf4" in formats]
    return kinds + [f for f in ("gguf", "w4a16") if "quantized" in spec.evaluation.models and f in formats]


def gguf_source(spec) -> str:
    from meddistill.quantized_formats import GGUF_DIR, gguf_file_name

    return f"{GGUF_DIR}/{gguf_file_name(spec.quantization.gguf_type)}"


def run(ctx: StageContext, out: Path) -> StageOutput:
    from meddistill.jobs import storage
    from meddistill.jobs.model_card import write_model_card
    from meddistill.jobs.results_table import build_results, markdown_table, plot
    from meddistill.quantized_formats import W4A16_DIR

    spec = ctx.spec
    ev = spec.evaluation
    sources = {  # (artifact URI, folder in it): each task fetches its model onto its own node
        "base": (None, spec.teacher.model),
        "teacher": (ctx.input_uri("teacher"), "model"),
        "student": (ctx.input_uri("distill"), "adapter"),
        "quantized": (ctx.input_uri("quantize"), ""),
    }
    resources = spec.teacher.resources  # the largest model decides what a worker needs
    settings = {"batch_size": ev.batch_size, "max_new_tokens": ev.max_new_tokens, "prompt_style": ev.prompt_style,
                "quantization": spec.quantization.method, "scoring": ev.scoring, "gpus": resources.gpus_per_worker,
                "latency_questions": ev.latency_questions}
    datasets, excluded = evaluation_records(ctx)
    task = storage.node_task(evaluate_on_node, out, num_cpus=resources.cpus_per_worker,
                             num_gpus=resources.gpus_per_worker, max_calls=1)
    evals = {}
    sources["gguf"] = (ctx.input_uri("quantize"), gguf_source(spec))
    sources["w4a16"] = (ctx.input_uri("quantize"), W4A16_DIR)
    for kind in evaluated_models(spec):  # one after another: latencies measured side by side must not share the CPU
        [evals[kind]] = storage.collect([task(kind, sources[kind], datasets, settings)], out)  # its reports reach `out`
        for r in evals[kind]:
            r["excluded"] = len(excluded[r["ref"]])
    results = build_results(evals, excluded, report_uri=ctx.uri("evaluate"), seed=ev.seed)
    (out / "results.json").write_text(json.dumps(results.model_dump(by_alias=True), indent=2))
    (out / "results.md").write_text("# MedDistill results\n\n" + markdown_table(results))
    details = sorted(out.glob("*/*/eval.md"))
    (out / "eval.md").write_text("\n\n".join(p.read_text() for p in details))
    plot(results, out / "results.png")
    write_model_card(ctx, out, upstream_manifests(ctx))
    headline = results.model_dump(include={"memory_reduction_pct", "latency_reduction_pct", "accuracy_retention_pct",
                                           "retention_ci_low", "retention_ci_high"})
    # Per model, the largest GPU peak over its datasets (each evaluation resets the peak); CPU runs have none.
    peaks = {f"peak_gpu_bytes_{kind}": max(r["peak_cuda_bytes"] for r in rows)
             for kind, rows in evals.items() if rows and rows[0]["peak_cuda_bytes"] is not None}
    return StageOutput(config=ev.model_dump(by_alias=True), metrics={"rows": len(results.rows), **headline, **peaks})
