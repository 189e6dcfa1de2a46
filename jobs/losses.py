"""Distillation losses, all over answer positions only (a boolean mask over logits[:, :-1]).

    loss = (1 - alpha) * CE + alpha * T^2 * KD          (Hinton et al. 2015)

KD is KL(teacher || student) at temperature T, computed from
  - the full teacher logits (`kl_full`, online teacher), or
  - the teacher's cached top-k log-probs (`kl_topk`): the teacher distribution is renormalised
    over its top-k ids, the student's log-probs are the full-vocabulary ones gathered at those
    ids. With k = vocab it equals `kl_full`; the gap shrinks with the teacher's tail mass.
Cross-tokenizer: `uld` (Boizard et al. 2024, Universal Logit Distillation): the L1 distance
between the sorted probability vectors of teacher and student, which needs no shared vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def topk_teacher(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache stores per answer position: (top-k ids int32, their log-probs at T=1, fp16)."""
    logprobs = F.log_softmax(teacher.float(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids.to(torch.int32), values.to(torch.float16)


def kl_topk(student: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL to a cached teacher: its top-k log-probs tempered and renormalised over the k ids."""
    t = F.log_softmax(topk_logprobs.float() / temperature, dim=-1)  # renormalise over the k ids
    s = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, topk_ids.long())
    return (t.exp() * (t - s)).sum(-1).mean()


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
