"""Evaluation harness: generation or log-likelihood scoring, answer extraction, accuracy with CIs,
open-answer quality, latency, reports; seeded stratified samples for `limit`."""
from meddistill.evaluation.harness import (
    SCORING_MODES, EvalResult, GroupScore, QuestionResult, evaluate, token_f1, wilson_interval,
)
from meddistill.evaluation.report import render_markdown, write_report
from meddistill.evaluation.sampling import sample_records

__all__ = ["SCORING_MODES", "EvalResult", "GroupScore", "QuestionResult", "evaluate", "render_markdown",
           "sample_records", "token_f1", "wilson_interval", "write_report"]
