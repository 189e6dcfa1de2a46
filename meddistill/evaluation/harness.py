"""Evaluate a causal LM on medical QA records: generation or log-likelihood scoring, and metrics.

    result = evaluate(model, tokenizer, records, style="plain", batch_size=8, max_new_tokens=32)
    result.accuracy, result.ci_low, result.ci_high, result.to_dict()

Two scoring modes, labelled in `EvalResult.scoring`:
  generative  greedy generation, then the answer is extracted from the text (meddistill.prompts).
              Closed questions (letters, yes/no/maybe) get accuracy with a Wilson 95% interval; an
              answer the extractor cannot parse is counted wrong and in `unparsed` (`truncated`
              counts those whose R1 reasoning never closed). Closed questions generate up to
              `max_new_tokens`, open ones (free text) up to `open_max_new_tokens`, in separate
              batches. Open questions with a reference get token F1 and ROUGE-L, never folded
              into accuracy; every answer gets a repetition measure, and records with
              `meta.keywords` a keyword hit (see open_metrics).
  loglik      lm-evaluation-harness's `acc`/`acc_norm` over the options (see loglik); only closed
              questions with a gold label are evaluated, so `n` counts those.

Speed, generative mode (loglik mode reports the forward passes' time and no batch-1 figures):
  warm-up              one short generation before any clock runs (kernels, allocator, caches).
  latency_mean/p50/p95 per question, the wall time of the batch it was in (every question in a
                       batch waits for the whole batch), at `batch_size`.
  seconds_per_question total generation time / n, at `batch_size`: the amortized cost.
  tokens_per_s         generated tokens (to EOS) / total generation time, at `batch_size`.
  latency_b1_s, ms_per_token_b1
                       batch 1 over the first `latency_questions` prompts: seconds per question,
                       and decode milliseconds per generated token (see latency).
"""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from meddistill.data.records import MedicalRecord
from meddistill.evaluation.generation import eos_ids, generate_batch, prepare_tokenizer
from meddistill.evaluation.latency import batch1_latency
from meddistill.evaluation.loglik import score_choices
from meddistill.evaluation.open_metrics import (
    is_repetitive, keyword_groups, keyword_hit, repeated_4gram_share, rouge_l, token_f1,
)
from meddistill.modelsource import input_device, model_weight_bytes, peak_gpu_memory_bytes, reset_peak_gpu_memory
from meddistill.prompts.extract import TRUNCATED, extract_answer
from meddistill.prompts.render import ends_with_open_think, render_prompt

log = logging.getLogger(__name__)
Z_95 = 1.959963984540054
SCORING_MODES = ("generative", "loglik")
__all__ = ["EvalResult", "GroupScore", "QuestionResult", "SCORING_MODES", "evaluate", "token_f1", "wilson_interval"]


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends: no 1e-17 rounding residue
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi



@dataclass
class QuestionResult:
    id: str  # the paired tests match models question by question on this id
    question_type: str
    gold: str | None
    predicted: str | None
    correct: bool | None  # None for open questions and unlabelled records
    f1: float | None  # open questions with a reference only
    reason: str | None  # extractor's reason when predicted is None (or a fallback note)
    output: str  # the generated text ("" in loglik mode)
    prompt_tokens: int
    new_tokens: int
    latency_s: float  # wall time of the batch this question was in (loglik: amortized per question)
    rouge_l: float | None = None  # open questions with a reference only
    repeated_4gram_share: float | None = None  # every generated answer
    repetitive: bool | None = None  # some word 4-gram occurs more than twice
    keyword_hit: bool | None = None  # records with meta.keywords only
    correct_norm: bool | None = None  # loglik: the acc_norm choice is right
    option_logprobs: dict[str, float] | None = None  # loglik: summed log-prob of each option


@dataclass
class GroupScore:
    n: int
    correct: int
    unparsed: int
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    truncated: int = 0  # of unparsed: R1 reasoning that never closed


@dataclass
class EvalResult:
    model: str
    dataset: str
    style: str
    batch_size: int
    max_new_tokens: int
    n: int  # questions evaluated (loglik: the closed, labelled ones only)
    n_scored: int  # closed questions with a gold label: the accuracy denominator
    correct: int
    accuracy: float | None  # loglik: lm-eval's acc
    ci_low: float | None  # Wilson 95%
    ci_high: float | None
    unparsed: int  # scored questions whose answer could not be extracted (counted wrong)
    unparsed_rate: float | None
    by_type: dict[str, GroupScore]
    open_n: int  # open questions with a reference (token F1 and ROUGE-L, not accuracy)
    open_f1: float | None
    latency_mean_s: float
    latency_p50_s: float
    latency_p95_s: float
    seconds_per_question: float  # generation wall time / n: the amortized cost at this batch size
    tokens_per_s: float  # generated tokens (up to EOS) per second of generation, at this batch size
    wall_s: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    weight_bytes: int
    device: str
    # Added later: defaults keep older eval.json files loadable.
    scoring: str = "generative"
    acc_norm: float | None = None  # loglik only
    truncated: int = 0  # of unparsed: R1 answers whose <think> never closed
    open_max_new_tokens: int | None = None
    latency_questions: int = 0  # prompts in the batch-1 pass
    latency_b1_s: float | None = None  # batch 1: mean seconds per question
    ms_per_token_b1: float | None = None  # batch 1: decode ms per generated token (prompt excluded)
    open_rouge_l: float | None = None
    repetition_mean: float | None = None  # mean repeated_4gram_share over generated answers
    repetitive_n: int = 0
    keyword_n: int = 0
    keyword_hits: int = 0
    questions: list[QuestionResult] = field(default_factory=list)

    def to_dict(self, include_questions: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not include_questions:
            data.pop("questions")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        data = dict(data)
        data["by_type"] = {k: GroupScore(**v) for k, v in data.get("by_type", {}).items()}
        data["questions"] = [QuestionResult(**q) for q in data.get("questions", [])]
        return cls(**data)


def is_open_ended(record: MedicalRecord) -> bool:
    """Free-text answers (no options, not yes/no/maybe): these get open_max_new_tokens."""
    return not record.options and record.question_type != "yes_no_maybe"


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[MedicalRecord],
    *,
    style: str = "plain",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    open_max_new_tokens: int = 96,
    scoring: str = "generative",
    latency_questions: int = 8,
    warmup: bool = True,
    progress: bool = True,
    model_name: str = "",
    dataset_name: str = "",
) -> EvalResult:
    """Score every record by generation or log-likelihood; see the module docstring."""
    if batch_size < 1 or max_new_tokens < 1 or open_max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size}, max_new_tokens={max_new_tokens} and "
                         f"open_max_new_tokens={open_max_new_tokens} must be >= 1")
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring={scoring!r} is unknown; use one of {SCORING_MODES}")
    if latency_questions < 0:
        raise ValueError(f"latency_questions={latency_questions} must be >= 0 (0 skips the batch-1 pass)")
    keywords = [keyword_groups(r.meta, r.id) for r in records]  # malformed keywords fail before any work
    device = input_device(model)
    if device.type == "cuda":  # the peak of this evaluation: the weights and what evaluating them takes
        reset_peak_gpu_memory()
    add_special = prepare_tokenizer(tokenizer)
    summary = dict(model=model, model_name=model_name, dataset_name=dataset_name, style=style,
                   batch_size=batch_size, max_new_tokens=max_new_tokens, device=device)
    model.eval()
    if scoring == "loglik":
        return _evaluate_loglik(model, tokenizer, records, add_special=add_special, summary=summary)

    from tqdm.auto import tqdm  # noqa: PLC0415

    prompts = [render_prompt(r, tokenizer, style) for r in records]
    lengths = [len(tokenizer(p, add_special_tokens=add_special)["input_ids"]) for p in prompts]
    budgets = [open_max_new_tokens if is_open_ended(r) else max_new_tokens for r in records]
    stop = eos_ids(model, tokenizer)
    started = time.perf_counter()
    if warmup and prompts:
        generate_batch(model, tokenizer, prompts[:1], max_new_tokens=2, add_special=add_special, stop=stop)

    outputs: dict[int, tuple[str, int, float]] = {}
    gen_seconds = 0.0
    bar = tqdm(total=len(records), desc="eval", unit="q", disable=not progress, file=sys.stderr)
    for open_ended in (False, True):  # separate batches: a short closed answer never waits for 96 tokens
        # Longest first: batches of similar length waste less on padding, and an out-of-memory
        # batch fails at the start instead of the end.
        order = sorted((i for i, r in enumerate(records) if is_open_ended(r) == open_ended), key=lambda i: -lengths[i])
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            new, seconds = generate_batch(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=budgets[idx[0]],
                                          add_special=add_special, stop=stop)
            gen_seconds += seconds
            for i, tokens in zip(idx, new):
                outputs[i] = (tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), seconds)
            bar.update(len(idx))
    bar.close()
    b1_s, ms_per_token = batch1_latency(model, tokenizer, prompts[:latency_questions], budgets[:latency_questions],
                                        add_special=add_special, stop=stop)
    wall = time.perf_counter() - started

    # A template that opens <think> itself (DeepSeek-R1's) makes an answer without </think> a cut-off one.
    questions = [_score(record, *outputs[i], prompt_tokens=lengths[i], keywords=keywords[i],
                        prefilled_think=ends_with_open_think(prompts[i])) for i, record in enumerate(records)]
    result = _summarize(questions, gen_seconds=gen_seconds, wall=wall, **summary)
    result.open_max_new_tokens = open_max_new_tokens
    result.latency_questions = min(latency_questions, len(records))
    result.latency_b1_s, result.ms_per_token_b1 = b1_s, ms_per_token
    return result


def _evaluate_loglik(model: Any, tokenizer: Any, records: Sequence[MedicalRecord], *, add_special: bool,
                     summary: dict[str, Any]) -> EvalResult:
    scored = [r for r in records if r.is_scored_by_choice]
    started = time.perf_counter()
    choices = score_choices(model, tokenizer, scored, style=summary["style"], batch_size=summary["batch_size"])
    seconds = time.perf_counter() - started
    questions = [
        QuestionResult(
            id=r.id, question_type=r.question_type, gold=r.answer, predicted=c.predicted,
            correct=c.predicted == r.answer, f1=None, reason=None, output="",
            prompt_tokens=len(tokenizer(render_prompt(r, tokenizer, summary["style"]),
                                        add_special_tokens=add_special)["input_ids"]),
            new_tokens=0, latency_s=seconds / len(scored), correct_norm=c.predicted_norm == r.answer,
            option_logprobs=c.logprobs,
        )
        for r, c in zip(scored, choices)
    ]
    result = _summarize(questions, gen_seconds=seconds, wall=seconds, **summary)
    result.scoring = "loglik"
    result.acc_norm = sum(q.correct_norm for q in questions) / len(questions) if questions else None
    return result


def _score(record: MedicalRecord, output: str, new_tokens: int, seconds: float, *, prompt_tokens: int,
           keywords: list[list[str]] | None, prefilled_think: bool = False) -> QuestionResult:
    extraction = extract_answer(output, record, prefilled_think=prefilled_think)
    closed = record.is_scored_by_choice
    correct = f1 = rouge = None
    if closed:
        correct = extraction.answer is not None and extraction.answer == record.answer
        if extraction.answer is None:
            log.debug("unparsed answer for %s (%s): %r", record.id, extraction.reason, output[:200])
    elif record.answer:
        f1 = token_f1(extraction.answer or "", record.answer)
        rouge = rouge_l(extraction.answer or "", record.answer)
    return QuestionResult(
        id=record.id, question_type=record.question_type, gold=record.answer, predicted=extraction.answer,
        correct=correct, f1=f1, reason=extraction.reason, output=output, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, latency_s=seconds, rouge_l=rouge,
        # The whole output, reasoning included: a loop inside <think> is degeneration too.
        repeated_4gram_share=repeated_4gram_share(output), repetitive=is_repetitive(output),
        keyword_hit=keyword_hit(output, keywords) if keywords else None,
    )


def _group(questions: list[QuestionResult]) -> GroupScore:
    scored = [q for q in questions if q.correct is not None]
    correct = sum(q.correct for q in scored)
    unparsed = sum(q.predicted is None for q in scored)
    lo, hi = wilson_interval(correct, len(scored)) if scored else (None, None)
    return GroupScore(n=len(scored), correct=correct, unparsed=unparsed,
                      accuracy=correct / len(scored) if scored else None, ci_low=lo, ci_high=hi,
                      truncated=sum(q.predicted is None and q.reason == TRUNCATED for q in scored))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summarize(questions: list[QuestionResult], *, model: Any, model_name: str, dataset_name: str, style: str,
               batch_size: int, max_new_tokens: int, gen_seconds: float, wall: float, device: Any) -> EvalResult:
    overall = _group(questions)
    by_type = {t: _group([q for q in questions if q.question_type == t])
               for t in sorted({q.question_type for q in questions})}
    by_type = {t: g for t, g in by_type.items() if g.n}
    open_q = [q for q in questions if q.f1 is not None]
    generated = [q for q in questions if q.repeated_4gram_share is not None]
    keyed = [q for q in questions if q.keyword_hit is not None]
    latencies = [q.latency_s for q in questions]
    new_tokens = sum(q.new_tokens for q in questions)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return EvalResult(
        model=model_name, dataset=dataset_name, style=style, batch_size=batch_size, max_new_tokens=max_new_tokens,
        n=len(questions), n_scored=overall.n, correct=overall.correct, accuracy=overall.accuracy,
        ci_low=overall.ci_low, ci_high=overall.ci_high, unparsed=overall.unparsed,
        unparsed_rate=overall.unparsed / overall.n if overall.n else None, by_type=by_type,
        open_n=len(open_q), open_f1=_mean([q.f1 for q in open_q]),
        latency_mean_s=_mean(latencies) or 0.0,
        latency_p50_s=_percentile(latencies, 0.5), latency_p95_s=_percentile(latencies, 0.95),
        seconds_per_question=gen_seconds / len(questions) if questions else 0.0,
        tokens_per_s=new_tokens / gen_seconds if gen_seconds > 0 else 0.0, wall_s=wall,
        peak_rss_bytes=peak_rss,
        peak_cuda_bytes=peak_gpu_memory_bytes() if device.type == "cuda" else None,
        weight_bytes=model_weight_bytes(model), device=str(device), truncated=overall.truncated,
        open_rouge_l=_mean([q.rouge_l for q in open_q if q.rouge_l is not None]),
        repetition_mean=_mean([q.repeated_4gram_share for q in generated]),
        repetitive_n=sum(bool(q.repetitive) for q in generated),
        keyword_n=len(keyed), keyword_hits=sum(q.keyword_hit for q in keyed), questions=questions,
    )
