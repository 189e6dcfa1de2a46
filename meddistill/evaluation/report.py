"""Write an EvalResult as eval.json (everything, per-question included) and eval.md (for people)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from meddistill.evaluation.harness import EvalResult


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{unit}"


def render_markdown(result: EvalResult, examples: int = 5) -> str:
    r = result
    loglik = r.scoring == "loglik"
    how = ("log-likelihood of each option (lm-eval acc / acc_norm)" if loglik else
           f"generation, max new tokens {r.max_new_tokens}"
           + (f" ({r.open_max_new_tokens} for open questions)" if r.open_max_new_tokens else ""))
    lines = [
        f"# Evaluation: {r.model or 'model'} on {r.dataset or 'dataset'}",
        "",
        f"Scoring `{r.scoring}`: {how}. Style `{r.style}`, batch size {r.batch_size}, device {r.device}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| questions | {r.n} (scored {r.n_scored}, open {r.open_n}) |",
        f"| accuracy{' (acc)' if loglik else ''} | {_pct(r.accuracy)} ({r.correct}/{r.n_scored}) |",
        f"| 95% CI (Wilson) | {_pct(r.ci_low)} – {_pct(r.ci_high)} |",
    ]
    if loglik:
        lines.append(f"| acc_norm (log-prob per character) | {_pct(r.acc_norm)} |")
    else:
        lines.append(f"| unparsed (counted wrong) | {r.unparsed} ({_pct(r.unparsed_rate)}), "
                     f"of which truncated reasoning {r.truncated} |")
    if r.open_n:
        lines.append(f"| open questions: mean token F1 / ROUGE-L | {_num(r.open_f1)} / {_num(r.open_rouge_l)} |")
    if r.repetition_mean is not None:
        lines.append(f"| repetition: mean repeated 4-gram share; repetitive answers | "
                     f"{_num(r.repetition_mean)}; {r.repetitive_n}/{r.n} |")
    if r.keyword_n:
        lines.append(f"| keyword questions hit | {r.keyword_hits}/{r.keyword_n} |")
    lines += [
        f"| latency per question (batch wall time) | mean {r.latency_mean_s:.2f} s, p50 {r.latency_p50_s:.2f} s, "
        f"p95 {r.latency_p95_s:.2f} s |",
        f"| amortized seconds per question (batch {r.batch_size}) | {r.seconds_per_question:.3f} |",
    ]
    if not loglik:
        lines.append(f"| generated tokens/s (batch {r.batch_size}) | {r.tokens_per_s:.1f} |")
    if r.latency_b1_s is not None:
        lines.append(f"| batch 1, first {r.latency_questions} questions | {r.latency_b1_s:.3f} s per question, "
                     f"{_num(r.ms_per_token_b1, '.1f', ' ms')} per generated token (decode) |")
    lines += [
        f"| wall time | {r.wall_s:.1f} s |",
        f"| peak RSS | {r.peak_rss_bytes / 2**20:.0f} MiB |",
    ]
    if r.peak_cuda_bytes is not None:
        lines.append(f"| peak CUDA allocated | {r.peak_cuda_bytes / 2**20:.0f} MiB |")
    lines += [f"| model weights | {r.weight_bytes / 2**20:.1f} MiB |", ""]
    if r.by_type:
        lines += ["## By question type", "", "| type | n | accuracy | 95% CI | unparsed |", "|---|---|---|---|---|"]
        for name, g in r.by_type.items():
            lines.append(f"| {name} | {g.n} | {_pct(g.accuracy)} | {_pct(g.ci_low)} – {_pct(g.ci_high)} | {g.unparsed} |")
        lines.append("")
    unparsed = [q for q in r.questions if q.correct is not None and q.predicted is None][:examples]
    if unparsed:
        lines += ["## Unparsed answers (first few)", ""]
        for q in unparsed:
            text = " ".join(q.output.split())[:160]
            lines.append(f"- `{q.id}`: {q.reason} — output: `{text}`")
        lines.append("")
    missed = [q for q in r.questions if q.keyword_hit is False][:examples]
    if missed:
        lines += ["## Keyword questions missed (first few)", ""]
        lines += [f"- `{q.id}`: `{' '.join(q.output.split())[:160]}`" for q in missed]
        lines.append("")
    return "\n".join(lines)


def write_report(result: EvalResult, out_dir: "str | os.PathLike") -> tuple[Path, Path]:
    """Write eval.json and eval.md into out_dir (created); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(result), encoding="utf-8")
    return json_path, md_path
