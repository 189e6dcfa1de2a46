"""Batch-1 latency: what one user waits for one answer, measured on the same prompts for every model.

For each prompt (the first `latency_questions` of the evaluation, in input order, after the
harness's warm-up generation):
  t_first  = a 1-token `generate` (prompt processing + the first token: time to first token)
  t_total  = the full greedy `generate` with the question's token budget, n new tokens (to EOS)
Returned:
  latency_b1_s     mean of t_total over the prompts: seconds per question at batch 1
  ms_per_token_b1  sum(t_total - t_first) / sum(n - 1) * 1000 over prompts with n > 1: decode time
                   per generated token, prompt processing excluded (None when no prompt got 2+ tokens)
"""
from __future__ import annotations

from typing import Any, Sequence

from meddistill.evaluation.generation import generate_batch


def batch1_latency(model: Any, tokenizer: Any, prompts: Sequence[str], budgets: Sequence[int], *,
                   add_special: bool, stop: list[int]) -> tuple[float | None, float | None]:
    """(latency_b1_s, ms_per_token_b1) for prompts with their max_new_tokens budgets; (None, None) if no prompts."""
    if not prompts:
        return None, None
    totals, decode_s, decode_tokens = [], 0.0, 0
    for prompt, budget in zip(prompts, budgets):
        _, t_first = generate_batch(model, tokenizer, [prompt], max_new_tokens=1, add_special=add_special, stop=stop)
        (tokens,), t_total = generate_batch(model, tokenizer, [prompt], max_new_tokens=budget,
                                            add_special=add_special, stop=stop)
        totals.append(t_total)
        if len(tokens) > 1:
            decode_s += max(0.0, t_total - t_first)  # timer noise must not make a token free
            decode_tokens += len(tokens) - 1
    ms_per_token = 1000 * decode_s / decode_tokens if decode_tokens else None
    return sum(totals) / len(totals), ms_per_token
