"""Training data for every stage: records -> decontaminated, capped list -> token ids + labels.

Prompts and targets are rendered only through meddistill.prompts, so training sees exactly the
text evaluation and serving see. Labels are -100 on prompt (and padding) tokens: the loss is on
answer tokens only. A too-long example loses the left of its prompt; a free-text answer longer
than what the prompt leaves (at least half of maxSeqLength) loses its end, never the question.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from meddistill.artifacts import sha256_json
from meddistill.data import MedicalRecord, decontaminate, load_dataset
from meddistill.prompts import render_prompt, render_target
from meddistill.prompts.render import ends_with_open_think

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class TrainingData:
    records: list[MedicalRecord]
    removed: list[tuple[str, str, str]]  # decontamination: (train id, eval id, reason)
    digest: str  # sha256 over the dataset refs and the ids kept, in order


def load_training_records(ctx, refs: list[str], max_samples: int = 0, seed: int = 42) -> TrainingData:
    """Load, decontaminate against spec.evaluation.datasets, shuffle (seeded) and cap the training set."""
    records = [r for ref in refs for r in load_dataset(ref, base_dir=ctx.base_dir).records]
    labelled = [r for r in records if r.answer is not None and str(r.answer).strip()]
    if len(labelled) < len(records):
        log.info("training data: %d unlabelled records skipped (no target)", len(records) - len(labelled))
    records = labelled
    eval_sets = [load_dataset(ref, base_dir=ctx.base_dir).records for ref in ctx.spec.evaluation.datasets]
    report = decontaminate(records, eval_sets)
    for train_id, eval_id, reason in report.removed:
        log.info("decontamination removed %s (collides with eval %s: %s)", train_id, eval_id, reason)
    log.info("decontamination: kept %d, removed %d", len(report.kept), len(report.removed))
    kept = list(report.kept)
    random.Random(seed).shuffle(kept)
    if max_samples:
        kept = kept[:max_samples]
    if not kept:
        raise ValueError(f"training data {refs}: no labelled records left after decontamination; add data")
    return TrainingData(kept, report.removed, sha256_json({"refs": refs, "ids": [r.id for r in kept]}))


def tokenize_example(
    record: MedicalRecord, tokenizer, style: str, max_length: int, target: str | None = None
) -> dict[str, list[int]]:
    """{input_ids, labels} for prompt + target (+ EOS); labels mask the prompt with -100."""
    prompt = render_prompt(record, tokenizer, style)
    target = target if target is not None else render_target(record, style)
    if ends_with_open_think(prompt) and target.lstrip().startswith("<think>"):
        # DeepSeek-R1(-Distill) templates end the prompt with "<think>\n" themselves: a target that opens it
        # again would teach "<think>\n<think>", which the model then writes at inference.
        target = target.lstrip()[len("<think>"):].lstrip("\n")
    target += tokenizer.eos_token or ""
    # Chat templates emit their own BOS; the plain fallback prompt (no template) needs the
    # tokenizer's, exactly as the evaluation harness tokenizes it.
    add_special = not getattr(tokenizer, "chat_template", None)
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    # A long free-text answer (MedQuAD, ChatDoctor) loses its end, not the question it answers:
    # the target keeps what the prompt leaves, but at least half the budget.
    room = max(max_length - len(prompt_ids), max_length // 2, 1)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"][: min(room, max_length - 1)]
    prompt_ids = prompt_ids[-(max_length - len(target_ids)):]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE] * len(prompt_ids) + target_ids}


def collate(examples: list[dict], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (padding labelled -100)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])  # a list (driver) or an int32 tensor (worker)
        labels[i, :n] = torch.as_tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_mask(labels):
    """Positions of logits[:, :-1] that predict an answer token (labels shifted by one)."""
    return labels[:, 1:] != IGNORE


def batches(examples: list, batch_size: int, rank: int, world: int, seed: int, epoch: int):
    """This rank's micro-batches for one epoch: a seeded shuffle, then every world-th example."""
    order = list(range(len(examples)))
    random.Random(seed + epoch).shuffle(order)
    mine = [examples[i] for i in order[rank::world]]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
