"""Evaluation harness: batched generation, answer extraction, accuracy with CIs, reports."""
from meddistill.evaluation.harness import EvalResult, GroupScore, QuestionResult, evaluate, token_f1, wilson_interval
from meddistill.evaluation.report import render_markdown, write_report

__all__ = ["EvalResult", "GroupScore", "QuestionResult", "evaluate", "render_markdown", "token_f1",
           "wilson_interval", "write_report"]
