"""Evaluate a causal LM on medical QA records: batched greedy generation, answer extraction, metrics.

    result = evaluate(model, tokenizer, records, style="plain", batch_size=8, max_new_tokens=32)
    result.accuracy, result.ci_low, result.ci_high, result.to_dict()

Closed questions (multiple choice letters, yes/no/maybe) are scored by accuracy with a Wilson 95%
interval; an answer the extractor cannot parse is logged at DEBUG with its reason and counted
wrong. Open questions have no letter to compare, so they get token F1 against the reference and
are reported apart, never folded into accuracy. Latency is measured per batch: every question
in a batch waits for the whole batch, so its latency is the batch's wall time.
"""
from __future__ import annotations

import logging
import math
import re
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from meddistill.data.records import MedicalRecord
from meddistill.modelsource import model_weight_bytes
from meddistill.prompts.extract import extract_answer
from meddistill.prompts.render import render_prompt

log = logging.getLogger(__name__)
Z_95 = 1.959963984540054


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


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 between two texts (lower-cased, punctuation dropped)."""
    pred = re.findall(r"[a-z0-9]+", prediction.lower())
    ref = re.findall(r"[a-z0-9]+", reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass
class QuestionResult:
    id: str
    question_type: str
    gold: str | None
    predicted: str | None
    correct: bool | None  # None for open questions and unlabelled records
    f1: float | None  # open questions only
    reason: str | None  # extractor's reason when predicted is None (or a fallback note)
    output: str  # the generated text
    prompt_tokens: int
    new_tokens: int
    latency_s: float  # wall time of the batch this question was in


@dataclass
class GroupScore:
    n: int
    correct: int
    unparsed: int
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass
class EvalResult:
    model: str
    dataset: str
    style: str
    batch_size: int
    max_new_tokens: int
    n: int  # all questions evaluated
    n_scored: int  # closed questions with a gold label: the accuracy denominator
    correct: int
    accuracy: float | None
    ci_low: float | None  # Wilson 95%
    ci_high: float | None
    unparsed: int  # scored questions whose answer could not be extracted (counted wrong)
    unparsed_rate: float | None
    by_type: dict[str, GroupScore]
    open_n: int  # open questions (token F1, not accuracy)
    open_f1: float | None
    latency_mean_s: float
    latency_p50_s: float
    latency_p95_s: float
    seconds_per_question: float  # generation wall time / n: the amortized cost at this batch size
    tokens_per_s: float  # generated tokens (up to EOS) per second of generation
    wall_s: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    weight_bytes: int
    device: str
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


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[MedicalRecord],
    *,
    style: str = "plain",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
    model_name: str = "",
    dataset_name: str = "",
) -> EvalResult:
    """Generate an answer for every record greedily and score it; see the module docstring."""
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Chat templates already emit any BOS they need; the plain fallback prompt does not.
    add_special = not getattr(tokenizer, "chat_template", None)
    prompts = [render_prompt(r, tokenizer, style) for r in records]
    lengths = [len(tokenizer(p, add_special_tokens=add_special)["input_ids"]) for p in prompts]
    # Longest first: batches of similar length waste less on padding, and an out-of-memory
    # batch fails at the start instead of the end.
    order = sorted(range(len(records)), key=lambda i: -lengths[i])
    eos_ids = _eos_ids(model, tokenizer)

    outputs: dict[int, tuple[str, int, float]] = {}
    gen_seconds = 0.0
    started = time.perf_counter()
    bar = tqdm(total=len(records), desc="eval", unit="q", disable=not progress, file=sys.stderr)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                              add_special_tokens=add_special).to(device)
            t0 = time.perf_counter()
            generated = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            gen_seconds += seconds
            new = generated[:, batch["input_ids"].shape[1]:].tolist()
            for i, tokens in zip(idx, new):
                tokens = _until_eos(tokens, eos_ids)
                outputs[i] = (tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), seconds)
            bar.update(len(idx))
    bar.close()
    wall = time.perf_counter() - started

    questions = [
        _score(record, *outputs[i], prompt_tokens=lengths[i]) for i, record in enumerate(records)
    ]
    return _summarize(
        questions, model=model, model_name=model_name, dataset_name=dataset_name, style=style,
        batch_size=batch_size, max_new_tokens=max_new_tokens, gen_seconds=gen_seconds, wall=wall,
        device=device,
    )


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for n, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: n + 1]
    return tokens


def _score(record: MedicalRecord, output: str, new_tokens: int, seconds: float, *, prompt_tokens: int) -> QuestionResult:
    extraction = extract_answer(output, record)
    closed = record.is_scored_by_choice
    correct = f1 = None
    if closed:
        correct = extraction.answer is not None and extraction.answer == record.answer
        if extraction.answer is None:
            log.debug("unparsed answer for %s (%s): %r", record.id, extraction.reason, output[:200])
    elif record.answer:
        f1 = token_f1(extraction.answer or "", record.answer)
    return QuestionResult(
        id=record.id, question_type=record.question_type, gold=record.answer, predicted=extraction.answer,
        correct=correct, f1=f1, reason=extraction.reason, output=output, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, latency_s=seconds,
    )


def _group(questions: list[QuestionResult]) -> GroupScore:
    scored = [q for q in questions if q.correct is not None]
    correct = sum(q.correct for q in scored)
    unparsed = sum(q.predicted is None for q in scored)
    lo, hi = wilson_interval(correct, len(scored)) if scored else (None, None)
    return GroupScore(n=len(scored), correct=correct, unparsed=unparsed,
                      accuracy=correct / len(scored) if scored else None, ci_low=lo, ci_high=hi)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _summarize(questions: list[QuestionResult], *, model: Any, model_name: str, dataset_name: str, style: str,
               batch_size: int, max_new_tokens: int, gen_seconds: float, wall: float, device: Any) -> EvalResult:
    import torch  # noqa: PLC0415

    overall = _group(questions)
    by_type = {t: _group([q for q in questions if q.question_type == t])
               for t in sorted({q.question_type for q in questions})}
    by_type = {t: g for t, g in by_type.items() if g.n}
    open_q = [q for q in questions if q.f1 is not None]
    latencies = [q.latency_s for q in questions]
    new_tokens = sum(q.new_tokens for q in questions)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return EvalResult(
        model=model_name, dataset=dataset_name, style=style, batch_size=batch_size, max_new_tokens=max_new_tokens,
        n=len(questions), n_scored=overall.n, correct=overall.correct, accuracy=overall.accuracy,
        ci_low=overall.ci_low, ci_high=overall.ci_high, unparsed=overall.unparsed,
        unparsed_rate=overall.unparsed / overall.n if overall.n else None, by_type=by_type,
        open_n=len(open_q), open_f1=sum(q.f1 for q in open_q) / len(open_q) if open_q else None,
        latency_mean_s=sum(latencies) / len(latencies) if latencies else 0.0,
        latency_p50_s=_percentile(latencies, 0.5), latency_p95_s=_percentile(latencies, 0.95),
        seconds_per_question=gen_seconds / len(questions) if questions else 0.0,
        tokens_per_s=new_tokens / gen_seconds if gen_seconds > 0 else 0.0, wall_s=wall,
        peak_rss_bytes=peak_rss,
        peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        weight_bytes=model_weight_bytes(model), device=str(device), questions=questions,
    )
