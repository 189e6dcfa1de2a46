"""Distillation losses, all over answer positions only (a boolean mask over logits[:, :-1]).

    loss = (1 - alpha) * CE + alpha * T^2 * KD          (Hinton et al. 2015)

KD is KL(teacher || student) at temperature T, computed from
  - the full teacher logits (`kl_full`, online teacher), or
  - the teacher's cached top-k (`kl_topk`) over k+1 buckets: its k most likely tokens and one
    "rest" bucket holding the tempered mass of all the others. The cache stores, per answer
    position and at the training temperature T, the teacher's log-probs at its top-k ids and the
    log of its tail mass (`topk_teacher`); the student's buckets are its own tempered log-probs at
    the same ids and its own tail mass. A student equal to its teacher gets KD = 0 (up to the
    cache's fp16 rounding), and by the data-processing inequality the bucketed KL never exceeds
    the full one. Because the buckets are tempered, a cache is only valid for the T it was made
    at (the distill-data manifest records it; the distill stage refuses a mismatch).
Cross-tokenizer: `uld` (Boizard et al. 2024, Universal Logit Distillation): the L1 distance
between the sorted probability vectors of teacher and student, which needs no shared vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Log-mass floor for an empty tail (k = vocabulary): finite, so no inf - inf = nan and fp16-safe.
EMPTY_TAIL = -1e4


def answer_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, V] logits at the answer positions (mask is over logits[:, :-1])."""
    return logits[:, :-1][mask]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE on answer tokens (labels -100 elsewhere)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def kl_full(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher/T) || softmax(student/T)); inputs [N, V] logits."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def bucket_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, k+1] log-probs at temperature T of the k tokens `ids`, then of all other tokens together."""
    scaled = logits.float() / temperature
    total = scaled.logsumexp(-1, keepdim=True)
    at_ids = scaled.gather(-1, ids.long()) - total
    # The tail as its own log-sum-exp, not log(1 - sum): exact even when the top k hold ~all mass.
    tail = scaled.scatter(-1, ids.long(), EMPTY_TAIL).logsumexp(-1, keepdim=True) - total
    return torch.cat([at_ids, tail.clamp(min=EMPTY_TAIL)], dim=-1)


def topk_teacher(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache stores per answer position: the top-k ids (int32) and the k+1 bucket
    log-probs at temperature T (fp16): the k ids' log-probs, then the log of the tail mass."""
    ids = teacher.float().topk(k, dim=-1).indices  # same order at every T > 0
    return ids.to(torch.int32), bucket_logprobs(teacher, ids, temperature).to(torch.float16)


def kl_topk(student: torch.Tensor, topk_ids: torch.Tensor, teacher_buckets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) over the k+1 buckets (top-k ids + the rest)."""
    # Renormalising the fp16 buckets keeps KL >= 0 and makes rounding a second-order error.
    t = F.log_softmax(teacher_buckets.float(), dim=-1)
    s = bucket_logprobs(student, topk_ids, temperature)
    p = t.exp()
    return torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1).mean()


def uld(student: torch.Tensor, teacher_sorted_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ULD: mean over rows of sum_i |s_(i) - t_(i)| over the k largest probabilities of each side.

    `teacher_sorted_probs` [N, k] is descending (the cache keeps the top k); the student's
    probabilities are sorted the same way and cut to k. Both tails beyond k are dropped: the
    teacher's is not cached, and comparing it to zero would only push the student to be peaked.
    """
    k = teacher_sorted_probs.size(-1)
    s = F.softmax(student.float() / temperature, dim=-1).topk(k, dim=-1).values
    return (s - teacher_sorted_probs.float()).abs().sum(-1).mean()


def distillation_loss(ce: torch.Tensor, kd: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KD (T^2 keeps KD gradients on CE's scale)."""
    return (1 - alpha) * ce + alpha * temperature**2 * kd
