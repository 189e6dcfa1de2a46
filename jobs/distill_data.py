"""Recipe: the teacher's outputs for distillation, computed once (spec.distillation.teacherCache: cached).

So the teacher is not in memory while the student trains. Per mode (spec.distillation.mode):
  logits           per answer position: the teacher's top-k token ids (int32) and k+1 bucket
                   log-probs at the training temperature T (fp16: the k ids, then the tail mass;
                   losses.topk_teacher), with the token ids/labels they belong to
                   -> shard-NNNNN.safetensors
  cross-tokenizer  per teacher answer position: the top-k probabilities at temperature T, sorted
                   descending (ULD needs no ids), and the character where that token ends in the
                   answer text (answer_alignment) -> shard-NNNNN.safetensors
  sequence         the teacher answers every training prompt (greedy, batched, maxNewTokens);
                   kept by `keep_teacher_answer`: closed questions when the extracted answer
                   equals the label, open ones when it is similar enough to the reference
                   -> generated.jsonl (generic jsonl MedicalRecords)
The records are split into spec.teacher.resources.workers shards, one Ray task each, the teacher
on the task's GPUs in 16 bits where it reserves some (jobs/devices.py), else on CPU in fp32. Both
tensor caches depend on T and k: the manifest's config records spec.distillation, and the
distill stage refuses a cache made with another temperature or topK.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from meddistill.jobs.stage import StageContext, StageOutput

log = logging.getLogger(__name__)
TENSOR_KEYS = ("topk_ids", "bucket_logprobs", "topk_probs", "char_ends", "topk_logprobs")  # last: pre-bucket caches
CLOSED_TYPES = ("multiple_choice", "yes_no_maybe")  # answers are a letter or a label


def write_shard(path: Path, examples: list[dict], teacher_key: str) -> None:
    """Examples (input_ids, labels, one [n_answer, k] teacher tensor) flattened into one file."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        "lengths": torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.int64),
        "input_ids": torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.int64),
        "labels": torch.tensor([t for e in examples for t in e["labels"]], dtype=torch.int64),
        "answer_counts": torch.tensor([len(e[teacher_key]) for e in examples], dtype=torch.int64),
    }
    for key in set(TENSOR_KEYS) & set(examples[0]):
        tensors[key] = torch.cat([e[key] for e in examples]).contiguous()
    # Record ids let a student with another tokenizer (cross-tokenizer) find its own text.
    save_file(tensors, str(path), metadata={"ids": json.dumps([e["id"] for e in examples])})


def read_shards(directory: Path) -> list[dict]:
    """All cached examples back as dicts of lists/tensors, in shard order."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    examples = []
    for path in sorted(Path(directory).glob("shard-*.safetensors")):
        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            ids_of = iter(json.loads(f.metadata()["ids"]))
        ids, labels = t["input_ids"].tolist(), t["labels"].tolist()
        keys = [k for k in TENSOR_KEYS if k in t]
        start = row = 0
        for length, count in zip(t["lengths"].tolist(), t["answer_counts"].tolist()):
            example = {"id": next(ids_of), "input_ids": ids[start : start + length], "labels": labels[start : start + length]}
            example.update({k: t[k][row : row + count] for k in keys})
            examples.append(example)
            start, row = start + length, row + count
    return examples


def teacher_answer_tensors(model, batch, mode: str, top_k: int, temperature: float) -> list[dict]:
    """Per example of a batch: the teacher's cached tensors at its answer positions."""
    import torch
    import torch.nn.functional as F

    from meddistill.jobs.losses import topk_teacher
    from meddistill.jobs.sft_data import answer_mask

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = answer_mask(batch["labels"]).to(logits.device)  # device_map="auto": logits leave on the last GPU
    out = []
    for i in range(logits.size(0)):
        rows = logits[i][mask[i]].float()  # a 16-bit teacher's log-probs are computed in fp32
        if mode == "logits":
            ids, buckets = topk_teacher(rows, top_k, temperature)
            out.append({"topk_ids": ids, "bucket_logprobs": buckets})
        else:
            probs = F.softmax(rows.float() / temperature, dim=-1).topk(top_k, dim=-1).values
            out.append({"topk_probs": probs.to(torch.float16)})
    return out


def teacher_shard(out_dir: str, teacher_uri: str, records: list[dict], spec_dict: dict, name: str) -> dict:
    """One Ray task on any node (storage.node_task): fetch the teacher artifact onto this node, load
    it, compute its outputs for `records`, write them to `out_dir/name`."""
    from meddistill.jobs import devices, storage
    from meddistill.modelsource import load_model, peak_gpu_memory_bytes, reset_peak_gpu_memory
    from meddistill.spec.models import MedDistillJobSpec

    spec = MedDistillJobSpec.model_validate(spec_dict)
    teacher_dir = str(storage.fetch_input(teacher_uri) / "model")
    path = str(Path(out_dir) / name)
    # On the GPUs this task reserved, in 16 bits, spread over them when one is too small (the 70B teacher).
    placement = devices.stage_device("distill-data", spec.teacher.resources.gpus_per_worker,
                                     devices.checkpoint_weight_bytes(teacher_dir))
    if placement.on_gpu:
        reset_peak_gpu_memory()
    model, tokenizer = load_model(teacher_dir, **placement.load_kwargs())
    stats = _teacher_outputs(model, tokenizer, spec, path, records)
    if placement.on_gpu:
        stats["peak_gpu_bytes"] = peak_gpu_memory_bytes()
    return stats


def _teacher_outputs(model, tokenizer, spec, path: str, records: list[dict]) -> dict:
    from meddistill.data import MedicalRecord
    from meddistill.jobs.answer_alignment import answer_char_ends
    from meddistill.jobs.sft_data import collate, tokenize_example
    from meddistill.modelsource import input_device

    dist, style = spec.distillation, spec.teacher.prompt_style
    recs = [MedicalRecord.from_dict(r) for r in records]
    batch_size = spec.student.training.batch_size
    if dist.mode == "sequence":
        return _generate(model, tokenizer, recs, style, dist, batch_size, path)
    examples = [tokenize_example(r, tokenizer, style, spec.student.training.max_seq_length) for r in recs]
    if dist.mode == "cross-tokenizer":
        import torch

        from meddistill.prompts import render_target

        for example, record in zip(examples, recs):
            n = sum(1 for t in example["labels"] if t != -100)
            ends = answer_char_ends(tokenizer, render_target(record, style), tokenizer.eos_token or "", n)
            example["char_ends"] = torch.tensor(ends, dtype=torch.int32)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(input_device(model)) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
        for example, tensors in zip(chunk, teacher_answer_tensors(model, batch, dist.mode, dist.top_k, dist.temperature)):
            example.update({k: v.cpu() for k, v in tensors.items()})
    for example, record in zip(examples, recs):
        example["id"] = record.id
    write_shard(Path(path), examples, "topk_ids" if dist.mode == "logits" else "topk_probs")
    return {"examples": len(examples), "answer_tokens": sum(sum(1 for t in e["labels"] if t != -100) for e in examples)}


def keep_teacher_answer(record, extraction, similarity_threshold: float) -> tuple[bool, str]:
    """(keep, kind) for one teacher answer in sequence mode; kind is "closed" or "open".

    Closed questions (a letter or yes/no/maybe) keep an answer equal to the label; open ones keep
    an answer whose token F1 or ROUGE-L against the reference reaches the threshold, since free
    text is almost never equal to the reference yet can still be right. Unparsed and truncated
    answers are never kept.
    """
    from meddistill.evaluation.open_metrics import rouge_l, token_f1

    closed = record.question_type in CLOSED_TYPES or bool(record.options)
    kind = "closed" if closed else "open"
    got = extraction.answer
    if got is None:
        return False, kind
    if record.answer is None:  # nothing to check against: the teacher's answer is the target
        return True, kind
    reference = str(record.answer)
    if closed:
        return got.strip().lower() == reference.strip().lower(), kind
    return max(token_f1(got, reference), rouge_l(got, reference)) >= similarity_threshold, kind


def _generate(model, tokenizer, records, style: str, dist, batch_size: int, path: str) -> dict:
    """Sequence-level KD data: teacher answers, kept by keep_teacher_answer."""
    import torch

    from meddistill.modelsource import input_device
    from meddistill.prompts import TRUNCATED, extract_answer, prompt_prefills_think, render_prompt

    prefilled = prompt_prefills_think(tokenizer, style)
    kept, counts = [], {f"{verdict}_{kind}": 0 for verdict in ("kept", "rejected") for kind in ("closed", "open")}
    counts["truncated"] = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [render_prompt(r, tokenizer, style) for r in chunk]
        add_special = not getattr(tokenizer, "chat_template", None)  # as sft_data / the evaluation harness
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special).to(input_device(model))
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=dist.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for record, text in zip(chunk, texts):
            got = extract_answer(text, record, prefilled_think=prefilled)
            keep, kind = keep_teacher_answer(record, got, dist.similarity_threshold)
            counts[f"{'kept' if keep else 'rejected'}_{kind}"] += 1
            counts["truncated"] += got.reason == TRUNCATED
            if not keep:
                continue
            row = record.to_dict()
            row.update(answer=got.answer, reasoning=got.reasoning, meta={**row["meta"], "teacher_text": text})
            kept.append(row)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept))
    return {"examples": len(kept), "rejected": counts["rejected_closed"] + counts["rejected_open"], **counts}


def run(ctx: StageContext, out: Path) -> StageOutput:
    from meddistill.jobs import storage
    from meddistill.jobs.sft_data import load_training_records

    spec = ctx.spec
    teacher_uri = ctx.input_uri("teacher")  # each task fetches the teacher onto its own node
    data = load_training_records(ctx, spec.teacher.datasets, spec.student.training.max_samples, spec.student.training.seed)
    for old in list(out.glob("shard-*")) + list(out.glob("generated*.jsonl")):
        old.unlink()
    resources = spec.teacher.resources
    n = max(1, min(resources.workers, len(data.records)))
    shard = storage.node_task(teacher_shard, out, num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker)
    name = "generated-{:05d}.jsonl" if spec.distillation.mode == "sequence" else "shard-{:05d}.safetensors"
    # Each task's file reaches `out` whatever node it ran on (collect downloads what it uploaded).
    stats = storage.collect(
        [shard(teacher_uri, [r.to_dict() for r in data.records[i::n]], spec.model_dump(), name.format(i)) for i in range(n)],
        out,
    )
    metrics = {k: sum(s.get(k, 0) for s in stats) for k in stats[0]}
    if "peak_gpu_bytes" in metrics:  # per task, not a total: the largest
        metrics["peak_gpu_bytes"] = max(s["peak_gpu_bytes"] for s in stats)
    metrics.update(mode=spec.distillation.mode, shards=n)
    log.info("distill-data: %s", metrics)
    if metrics["examples"] == 0:
        raise RuntimeError(
            "distill-data: the teacher produced no usable examples (sequence mode keeps only correct answers); "
            "raise spec.distillation.maxNewTokens or train the teacher longer"
        )
    config = {"distillation": spec.distillation.model_dump(by_alias=True), "teacher_artifact": teacher_uri}
    return StageOutput(config=config, metrics=metrics, data_digest=data.digest)
