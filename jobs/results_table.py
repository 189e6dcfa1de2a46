"""The paper's table from per-model evaluation results: rows, paired comparisons, the paper's
relative figures, markdown and a plot. Pure: no model is loaded here.

Input: `evals[kind]` = one dict per dataset, EvalResult.to_dict(include_questions=False) plus
  correct_by_id   {question id: answered correctly} for the scored questions (pairs by id)
  dtype           what the model was evaluated in (bfloat16, float32, nf4, ...)
  excluded        sampled questions left out because training saw them

The paper's comparison is the quantized student against the same merged student in 16 bits: that
isolates what quantization costs. The quantized student against the fp32 teacher mixes distillation,
pruning and precision, so it is reported only as a second, labelled line.
"""
from __future__ import annotations

from pathlib import Path

from meddistill.evaluation.stats import mcnemar_exact, paired_bootstrap, verdict
from meddistill.spec.models import Comparison, ExcludedQuestions, Reductions, Results, ResultRow

# gguf, w4a16: the quantize artifact's llama.cpp and compressed-tensors formats (quantization.formats), when made.
ORDER = ("base", "teacher", "student", "quantized", "gguf", "w4a16")
# (a, b): b - a. ("base", "quantized") is what the evaluation gate's notWorseThanBase reads (meddistill/gate.py):
# the whole pipeline's effect on the served model, paired on the same questions.
PAIRS = (("base", "teacher"), ("teacher", "student"), ("student", "quantized"), ("base", "quantized"),
         ("student", "gguf"), ("student", "w4a16"))


def result_row(kind: str, r: dict) -> ResultRow:
    b1 = r.get("latency_b1_s")
    return ResultRow(
        model=kind, dataset=r["dataset"], accuracy=r["accuracy"] or 0.0, ci_low=r["ci_low"] or 0.0,
        ci_high=r["ci_high"] or 0.0, n=r["n_scored"], excluded=r.get("excluded", 0), unparsed_rate=r["unparsed_rate"] or 0.0,
        scoring=r.get("scoring", "generative"), dtype=r.get("dtype", ""), weight_bytes=r["weight_bytes"],
        peak_memory_bytes=r["peak_cuda_bytes"] or r["peak_rss_bytes"], latency_ms=1000 * r["seconds_per_question"],
        latency_b1_ms=None if b1 is None else 1000 * b1, ms_per_token=r.get("ms_per_token_b1"),
        tokens_per_second=r["tokens_per_s"], open_f1=r.get("open_f1"), open_rouge_l=r.get("open_rouge_l"),
        repetition_mean=r.get("repetition_mean"), repetitive_n=r.get("repetitive_n"),
        keyword_hits=r.get("keyword_hits"), keyword_n=r.get("keyword_n"),
    )


def paired_answers(a: dict, b: dict) -> tuple[list[bool], list[bool]]:
    """Correctness of two models on the questions both were scored on, in the same order (by id)."""
    ids = sorted(set(a["correct_by_id"]) & set(b["correct_by_id"]))
    return [a["correct_by_id"][i] for i in ids], [b["correct_by_id"][i] for i in ids]


def compare(a_kind: str, b_kind: str, a: dict, b: dict, seed: int = 0) -> Comparison | None:
    a_ok, b_ok = paired_answers(a, b)
    if not a_ok:
        return None
    only_b, only_a, p = mcnemar_exact(a_ok, b_ok)
    boot = paired_bootstrap(a_ok, b_ok, seed=seed)
    return Comparison(
        a=a_kind, b=b_kind, dataset=a["dataset"], n=len(a_ok), delta_pct_points=round(100 * boot.diff, 2),
        ci_low=round(100 * boot.diff_low, 2), ci_high=round(100 * boot.diff_high, 2), only_a_correct=only_a,
        only_b_correct=only_b, p_value=p, verdict=verdict(b_kind, a_kind, boot.diff, p, len(a_ok)),
    )


def _by_dataset(results: list[dict]) -> dict[str, dict]:
    return {r["dataset"]: r for r in results}


def comparisons(evals: dict[str, list[dict]], seed: int = 0) -> list[Comparison]:
    """teacher - base, student - teacher, quantized - student, quantized - base on each dataset both were evaluated on."""
    out = []
    for a_kind, b_kind in PAIRS:
        if a_kind in evals and b_kind in evals:
            a_sets, b_sets = _by_dataset(evals[a_kind]), _by_dataset(evals[b_kind])
            out += [c for d in a_sets if d in b_sets if (c := compare(a_kind, b_kind, a_sets[d], b_sets[d], seed))]
    return out


def _footprint(rows: list[ResultRow]) -> dict[str, float | None]:
    """One model's footprint over its datasets: weights, worst peak, n-weighted batch-1 latencies."""
    n = sum(r.n for r in rows) or 1

    def mean(field):
        values = [(getattr(r, field), r.n) for r in rows]
        return None if any(v is None for v, _ in values) else sum(v * k for v, k in values) / n

    return {"weights": rows[0].weight_bytes, "peak": max(r.peak_memory_bytes for r in rows),
            "latency": mean("latency_b1_ms"), "per_token": mean("ms_per_token")}


def _reduction(new: float | None, old: float | None) -> float | None:
    return None if not new or not old else round(100 * (1 - new / old), 2)


def reductions(quantized: list[ResultRow], baseline: list[ResultRow]) -> Reductions:
    q, b = _footprint(quantized), _footprint(baseline)
    return Reductions(
        baseline=f"{baseline[0].model} ({baseline[0].dtype or 'unknown dtype'})",
        memory_reduction_pct=_reduction(q["weights"], b["weights"]),
        peak_memory_reduction_pct=_reduction(q["peak"], b["peak"]),
        latency_reduction_pct=_reduction(q["latency"], b["latency"]),
        per_token_latency_reduction_pct=_reduction(q["per_token"], b["per_token"]),
    )


def retention(student: list[dict], quantized: list[dict], seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """Quantized accuracy as % of the 16-bit student's, all datasets pooled, with its bootstrap interval."""
    s_sets, q_sets = _by_dataset(student), _by_dataset(quantized)
    s_ok, q_ok = [], []
    for d in s_sets.keys() & q_sets.keys():
        a, b = paired_answers(s_sets[d], q_sets[d])
        s_ok += a
        q_ok += b
    if not s_ok:
        return None, None, None
    boot = paired_bootstrap(s_ok, q_ok, seed=seed)
    if boot.ratio is None:  # the student got nothing right: no retention to speak of
        return None, None, None
    return round(100 * boot.ratio, 2), round(100 * boot.ratio_low, 2), round(100 * boot.ratio_high, 2)


def build_results(evals: dict[str, list[dict]], excluded: dict[str, list[str]], report_uri: str = "", seed: int = 0) -> Results:
    rows = [result_row(kind, r) for kind in ORDER if kind in evals for r in evals[kind]]
    # Footprint, latency and retention come from the generative rows: what serving does. Loglik
    # rows (labelled "[loglik]") are scored and compared too, but never pooled with them.
    by_model = {kind: [r for r in rows if r.model == kind and r.scoring == "generative"] for kind in ORDER}
    generative = {kind: [e for e in results if e.get("scoring", "generative") == "generative"] for kind, results in evals.items()}
    fields: dict = {}
    if by_model["quantized"] and by_model["student"]:
        paper = reductions(by_model["quantized"], by_model["student"])
        fields = paper.model_dump(exclude={"baseline"})
        ret, lo, hi = retention(generative["student"], generative["quantized"], seed)
        fields |= {"accuracy_retention_pct": ret, "retention_ci_low": lo, "retention_ci_high": hi}
    if by_model["quantized"] and by_model["teacher"]:
        fields["teacher_vs_quantized"] = reductions(by_model["quantized"], by_model["teacher"])
    return Results(
        rows=rows, comparisons=comparisons(evals, seed),
        excluded=[ExcludedQuestions(dataset=d, count=len(ids), ids=ids) for d, ids in excluded.items()],
        report_uri=report_uri, **fields,
    )


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} %"


def _minus(v: float | None) -> str:
    """A reduction as a signed change: 64.7 -> "-64.7 %", -5.0 (it grew) -> "+5.0 %"."""
    return "n/a" if v is None else f"{-v:+.1f} %"


def _ms(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def n_label(row: ResultRow) -> str:
    return f"{row.n}" + (f" ({row.excluded} excluded: seen in training)" if row.excluded else "")


def paper_line(results: Results) -> str:
    r = results
    if r.memory_reduction_pct is None and r.accuracy_retention_pct is None:
        return "Paper's comparison (quantized vs 16-bit student): not available (evaluate both student and quantized)."
    student = next((row for row in r.rows if row.model == "student"), None)
    retention = ("accuracy retention n/a (the student answered nothing correctly)" if r.accuracy_retention_pct is None
                 else f"accuracy retention {r.accuracy_retention_pct:.1f} % (95% CI {r.retention_ci_low:.1f}-{r.retention_ci_high:.1f})")
    dtype = student.dtype if student else ""
    label = ("16-bit student" + (f", {dtype}" if dtype else "")) if dtype != "float32" else "student in float32: no bf16 on this hardware"
    return (
        f"Paper's comparison (quantized vs {label}): "
        f"weight memory {_minus(r.memory_reduction_pct)}, peak {_minus(r.peak_memory_reduction_pct)}, "
        f"latency {_minus(r.latency_reduction_pct)} (b1), per token {_minus(r.per_token_latency_reduction_pct)}, {retention}."
    )


def gguf_line(results: Results) -> str | None:
    """The gguf student against the 16-bit student, as the paper's comparison (generative rows)."""
    rows = {kind: [r for r in results.rows if r.model == kind and r.scoring == "generative"] for kind in ("student", "gguf")}
    if not rows["gguf"] or not rows["student"]:
        return None
    r = reductions(rows["gguf"], rows["student"])
    deltas = [f"{c.dataset} {c.delta_pct_points:+.1f} points (p={c.p_value:.2g})" for c in results.comparisons
              if (c.a, c.b) == ("student", "gguf") and not c.dataset.endswith("[loglik]")]
    return (
        f"GGUF student ({rows['gguf'][0].dtype}) vs 16-bit student: weight memory {_minus(r.memory_reduction_pct)}, "
        f"latency {_minus(r.latency_reduction_pct)} (b1), per token {_minus(r.per_token_latency_reduction_pct)}, "
        f"accuracy {', '.join(deltas) or 'n/a'}."
    )


def teacher_line(results: Results) -> str | None:
    t = results.teacher_vs_quantized
    if t is None:
        return None
    return (
        f"Teacher vs quantized student (second line, not the paper's comparison; baseline {t.baseline}): "
        f"weight memory {_minus(t.memory_reduction_pct)}, peak {_minus(t.peak_memory_reduction_pct)}, "
        f"latency {_minus(t.latency_reduction_pct)} (b1), per token {_minus(t.per_token_latency_reduction_pct)}."
    )


ROW_COLUMNS = ("model", "dtype", "dataset", "accuracy (95% CI)", "n", "unparsed", "weights MB", "peak MB",
               "b1 latency ms/q", "ms/token", "tok/s at batch")
COMPARISON_COLUMNS = ("comparison", "dataset", "n", "Δ accuracy, points (95% CI)", "only a / only b right", "McNemar p", "verdict")


OPEN_COLUMNS = ("model", "dataset", "token F1", "ROUGE-L", "repeated 4-grams", "repetitive answers", "keyword hits")


def row_cells(r: ResultRow) -> list[str]:
    # A dataset of open questions only has nothing to score by accuracy: say so, not "0.0%".
    accuracy = f"{100 * r.accuracy:.1f}% ({100 * r.ci_low:.1f}–{100 * r.ci_high:.1f})" if r.n else "n/a (open questions)"
    return [r.model, r.dtype, r.dataset, accuracy,
            n_label(r), f"{100 * r.unparsed_rate:.0f}%", f"{r.weight_bytes / 2**20:.1f}", f"{r.peak_memory_bytes / 2**20:.0f}",
            _ms(r.latency_b1_ms), _ms(r.ms_per_token, 1), f"{r.tokens_per_second:.1f}"]


def comparison_cells(c: Comparison) -> list[str]:
    return [f"{c.b} - {c.a}", c.dataset, str(c.n), f"{c.delta_pct_points:+.1f} ({c.ci_low:+.1f} to {c.ci_high:+.1f})",
            f"{c.only_a_correct} / {c.only_b_correct}", f"{c.p_value:.3g}", c.verdict]


def open_rows(results: Results) -> list[ResultRow]:
    return [r for r in results.rows if r.open_f1 is not None or r.keyword_n]


def open_cells(r: ResultRow) -> list[str]:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    return [r.model, r.dataset, num(r.open_f1, ".3f"), num(r.open_rouge_l, ".3f"), num(r.repetition_mean, ".1%"),
            num(r.repetitive_n, "d"), f"{r.keyword_hits}/{r.keyword_n}" if r.keyword_n else "n/a"]


def excluded_lines(results: Results) -> list[str]:
    return [f"Excluded from {e.dataset} (seen in training): {e.count}: {', '.join(e.ids)}" for e in results.excluded if e.count]


def markdown_table(results: Results) -> str:
    def md(cells):
        return "| " + " | ".join(cells) + " |"

    lines = [md(ROW_COLUMNS), md(["---"] * len(ROW_COLUMNS))] + [md(row_cells(r)) for r in results.rows]
    if open_rows(results):
        lines += ["", md(OPEN_COLUMNS), md(["---"] * len(OPEN_COLUMNS))] + [md(open_cells(r)) for r in open_rows(results)]
    if results.comparisons:
        lines += ["", md(COMPARISON_COLUMNS), md(["---"] * len(COMPARISON_COLUMNS))]
        lines += [md(comparison_cells(c)) for c in results.comparisons]
    lines += ["", paper_line(results)]
    for extra in (gguf_line(results), teacher_line(results)):
        if extra is not None:
            lines += ["", extra]
    for line in excluded_lines(results):
        lines += ["", line]
    return "\n".join(lines) + "\n"


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.rows
    labels = [f"{r.model}\n{r.dataset.split(':')[0]}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(max(12.0, 1.5 * len(rows)), 3.6))
    acc = [100 * r.accuracy for r in rows]
    # max(0, .): the Wilson bounds can sit a rounding error past the point estimate at 0% or 100%
    err = [[max(0.0, 100 * (r.accuracy - r.ci_low)) for r in rows], [max(0.0, 100 * (r.ci_high - r.accuracy)) for r in rows]]
    axes[0].bar(labels, acc, yerr=err, capsize=4, color="#4c72b0")
    axes[0].set_ylabel("accuracy % (95% CI)")
    axes[1].bar(labels, [r.weight_bytes / 2**20 for r in rows], color="#55a868")
    axes[1].set_ylabel("weights MB")
    axes[2].bar(labels, [r.latency_b1_ms if r.latency_b1_ms is not None else r.latency_ms for r in rows], color="#c44e52")
    axes[2].set_ylabel("latency ms / question (batch 1)")
    fig.suptitle("base vs teacher vs student (16-bit) vs quantized student")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
