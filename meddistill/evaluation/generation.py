"""Greedy generation for evaluation: one timed `generate` call over a batch of prompts.

Evaluation and the batch-1 latency pass share this, so both decode the same way (greedy, stop at
any of the model's EOS ids, left padding) and time the same thing (the `generate` call, with a
CUDA synchronize before the clock stops).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from meddistill.modelsource import input_device


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def until_eos(tokens: list[int], stop: list[int]) -> list[int]:
    """The tokens up to and including the first EOS: what the model actually generated."""
    for n, tok in enumerate(tokens):
        if tok in stop:
            return tokens[: n + 1]
    return tokens


def prepare_tokenizer(tokenizer: Any) -> bool:
    """Left padding and a pad token for batched generation; returns add_special_tokens for prompts.

    Chat templates already emit any BOS they need; the plain fallback prompt does not.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return not getattr(tokenizer, "chat_template", None)


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   add_special: bool, stop: list[int]) -> tuple[list[list[int]], float]:
    """(new token ids per prompt, cut at EOS; seconds the generate call took)."""
    import torch  # noqa: PLC0415

    device = input_device(model)
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
            top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop,
        )
    if device.type == "cuda":  # every GPU: a model spread by device_map="auto" ends on another one
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
    seconds = time.perf_counter() - t0
    new = generated[:, batch["input_ids"].shape[1]:].tolist()
    return [until_eos(tokens, stop) for tokens in new], seconds
