"""Recipe: distil the fine-tuned teacher into a LoRA student on Ray Train (data parallel).

Features: the student is spec.student.model or the teacher pruned to derive.keepLayers layers
(student.py); PEFT LoRA on spec.student.lora.targetModules; three modes (spec.distillation.mode):
  logits           (1-alpha)*CE + alpha*T^2*KL(teacher||student) on answer tokens; the teacher's
                   top-k + tail buckets come from the distill-data cache (losses.kl_topk), or
                   (teacherCache: online) its full logits from the teacher in the same worker
  sequence         plain SFT on the teacher's own kept answers (what DeepSeek did for R1's
                   distilled models), any tokenizers
  cross-tokenizer  (1-alpha)*CE + alpha*ULD, the teacher's sorted top-k probabilities cached per
                   teacher answer token. Alignment by character offsets (answer_alignment): each
                   student answer token is paired with the teacher token covering its last
                   character, not with the teacher token at the same position (Boizard et al.
                   2024 pair by position), which drifts as soon as one tokenizer splits a number
                   or word the other keeps whole.
The frozen base (and an online teacher) sit on the worker's device in training.precision, the
fp32 adapters compute under autocast (fp16 with loss scaling). Examples reach the workers through
Ray Data; the step loop is the teacher's (train_loop.py). Checkpoints (adapter + optimizer +
scheduler + step) every checkpointEverySteps; a restarted worker or run resumes from the latest.
Workers on any node get their inputs by URI, never by a driver path: the pruned base (the
artifact's base/, uploaded before training) and an online teacher are fetched and verified on
the worker's own node (storage.fetch_input). Output: <artifact>/adapter (PEFT; its base is
spec.student.model, or `../base`, the pruned base beside it, so the artifact loads wherever it is
fetched), merged into the base by the quantize stage.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from meddistill.jobs import train_common as tc
from meddistill.jobs.sft_data import IGNORE, collate, load_training_records, tokenize_example
from meddistill.jobs.stage import StageContext, StageError, StageOutput

log = logging.getLogger(__name__)
TEACHER_KEYS = ("topk_ids", "bucket_logprobs", "topk_probs")
RERUN = "re-run: meddistill run FILE --stage distill-data --force"
DERIVED_BASE = "../base"  # the adapter's base for a pruned student: relative to the adapter folder


def collate_distill(examples: list[dict], pad_id: int):
    """collate() plus the teacher's cached rows, one per student answer position in teacher_mask.

    Logit KD (same tokenizer): row i belongs to answer position i. ULD: the teacher row of each
    student answer token is chosen by character offsets (answer_alignment); student tokens with
    no teacher token (the teacher's answer was cut shorter) are left out of teacher_mask.
    """
    import torch

    from meddistill.jobs.answer_alignment import align_by_char_end

    batch = collate(examples, pad_id)
    keys = [k for k in TEACHER_KEYS if k in examples[0]]
    if not keys:
        return batch
    mask = batch["labels"][:, 1:] != IGNORE
    aligned = torch.zeros_like(mask)
    rows = {k: [] for k in keys}
    for i, e in enumerate(examples):
        positions = mask[i].nonzero().flatten()
        n_teacher = len(e[keys[0]])
        if "topk_probs" in e:
            pairs = align_by_char_end(e["char_ends"], e["teacher_char_ends"])
            paired = torch.tensor([j is not None for j in pairs], dtype=torch.bool)
            index = torch.tensor([j for j in pairs if j is not None], dtype=torch.long)
            aligned[i, positions[paired]] = True
        elif n_teacher != len(positions):
            raise StageError(
                f"cached teacher outputs cover {n_teacher} answer tokens but the student sees {len(positions)} "
                f"(tokenizer or maxSeqLength changed since distill-data); {RERUN}"
            )
        else:
            index = torch.arange(n_teacher)
            aligned[i, positions] = True
        for k in keys:
            rows[k].append(e[k][index])
    batch["teacher_mask"] = aligned
    batch.update({k: torch.cat(v) for k, v in rows.items()})
    return batch


def batch_loss(model, teacher, batch, dist) -> tuple:
    """(loss, ce, kd) for one micro-batch in the configured mode."""
    import torch

    from meddistill.jobs import losses

    t_logits = None
    if teacher is not None and dist.mode == "logits":  # online teacher: run it first (no graph to keep)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = losses.cross_entropy(logits, batch["labels"])
    if dist.mode == "sequence":
        return ce, ce, torch.zeros((), device=ce.device)
    if dist.mode == "cross-tokenizer":
        kd = losses.uld(losses.answer_logits(logits, batch["teacher_mask"]), batch["topk_probs"], dist.temperature)
        return (1 - dist.alpha) * ce + dist.alpha * kd, ce, kd
    mask = batch["labels"][:, 1:] != IGNORE
    student = losses.answer_logits(logits, mask)
    if t_logits is not None:
        kd = losses.kl_full(student, losses.answer_logits(t_logits, mask), dist.temperature)
    else:
        kd = losses.kl_topk(student, batch["topk_ids"], batch["bucket_logprobs"], dist.temperature)
    return losses.distillation_loss(ce, kd, dist.alpha, dist.temperature), ce, kd


def build_student(base: str, training, lora, device, precision: str):
    """The base model, frozen, in the training precision on the worker's device, with fresh fp32
    LoRA adapters (only they train)."""
    from meddistill.jobs.lora import add_lora

    model, tokenizer = tc.load_training_model(base, tc.PRECISION_DTYPES[precision], device,
                                              gradient_checkpointing=training.gradient_checkpointing)
    return add_lora(model, lora), tokenizer


def load_online_teacher(teacher_dir: str, device, precision: str):
    """teacherCache: online: the fine-tuned teacher, frozen, beside the student on the same device."""
    model, _ = tc.load_training_model(teacher_dir, tc.PRECISION_DTYPES[precision], device)
    model.eval().requires_grad_(False)
    return model


def distill_loop(config: dict) -> None:
    """One Ray Train worker: LoRA student (DDP across workers), then the shared step loop, then the adapter."""
    tc.worker_setup(config)  # config: out_dir + total_steps for the progress file
    import ray.train
    import ray.train.torch
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from meddistill.jobs.train_loop import Recipe, run_steps
    from meddistill.spec.models import Distillation, Student

    student, dist = Student.model_validate(config["student"]), Distillation.model_validate(config["distillation"])
    training = student.training
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(training.seed)
    examples = tc.worker_examples()
    device = tc.worker_device()
    precision = tc.runnable_precision(training.precision, device, "spec.student.training.precision")
    # Frozen weights stay in the training precision; the fp32 adapters compute under autocast.
    # fp16 needs loss scaling (bf16 has fp32's exponent range and does not).
    autocast = (torch.autocast(device.type, dtype=getattr(torch, tc.PRECISION_DTYPES[precision]))
                if precision != "fp32" else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    from meddistill.jobs import storage

    # inputs by URI, fetched onto this worker's node: the driver's paths do not exist here
    base = str(storage.fetch_input(config["base_uri"], stage="distill")) if config["base_uri"] else config["base"]
    peft_model, tokenizer = build_student(base, training, student.lora, device, precision)
    teacher = (load_online_teacher(str(storage.fetch_input(config["teacher_uri"]) / "model"), device, precision)
               if config["online"] else None)
    model = ray.train.torch.prepare_model(peft_model, move_to_device=False)  # DDP when world > 1; already placed
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training.learning_rate, weight_decay=training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tc.lr_lambda(config["total_steps"], training.warmup_ratio))
    gas = training.gradient_accumulation_steps

    def micro_step(batch: dict) -> dict:
        with autocast:
            loss, ce, kd = batch_loss(model, teacher, batch, dist)
        scaler.scale(loss / gas).backward()
        return {"loss": loss.item(), "ce": ce.item(), "kd": kd.item()}

    def apply() -> None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def save(directory: Path, step: int) -> None:
        if rank == 0:  # LoRA weights are replicated (DDP): one copy is the checkpoint
            torch.save({"adapter": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step}, Path(directory) / "state.pt")

    def load(directory: Path) -> int:
        # weights_only: a checkpoint on shared storage is data, not code (a pickle could run anything)
        state = torch.load(Path(directory) / "state.pt", weights_only=True, map_location=device)
        set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])

    recipe = Recipe(collate=lambda ex: collate_distill(ex, tokenizer.pad_token_id), micro_step=micro_step,
                    apply=apply, save=save, load=load)
    run_steps(config, training, examples, device, recipe)
    if rank == 0:
        target = Path(config["out_dir"]) / "adapter"
        shutil.rmtree(target, ignore_errors=True)
        peft_model.peft_config["default"].base_model_name_or_path = config["adapter_base"]
        peft_model.save_pretrained(target)


def student_examples(ctx: StageContext, base: str) -> list[dict]:
    """Token ids, labels and (cached modes) the teacher's rows, for the configured mode."""
    from meddistill.data import load_dataset
    from meddistill.jobs.distill_data import read_shards
    from meddistill.modelsource import load_tokenizer
    from meddistill.prompts import render_target

    spec = ctx.spec
    dist, training, style = spec.distillation, spec.student.training, spec.teacher.prompt_style
    tokenizer = load_tokenizer(base)
    if dist.mode == "sequence":
        cache = ctx.input_dir("distill-data")
        records = [r for p in sorted(cache.glob("generated-*.jsonl")) for r in load_dataset(f"jsonl:{p}").records]
        return [tokenize_example(r, tokenizer, style, training.max_seq_length, render_target(r, style, r.reasoning)) for r in records]
    if dist.mode == "logits":
        teacher_tokenizer = load_tokenizer(str(ctx.input_dir("teacher") / "model"))
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise StageError(
                f"spec.distillation.mode=logits needs the teacher's tokenizer, but student {base!r} has another "
                f"vocabulary ({len(tokenizer)} vs {len(teacher_tokenizer)} tokens); use mode: cross-tokenizer or sequence"
            )
    if dist.teacher_cache == "online":
        data = load_training_records(ctx, spec.teacher.datasets, training.max_samples, training.seed)
        return [tokenize_example(r, tokenizer, style, training.max_seq_length) for r in data.records]
    cache = ctx.input_dir("distill-data")
    check_cache_settings(cache, dist)
    cached = read_shards(cache)
    if dist.mode == "logits":
        return cached
    # cross-tokenizer: the student's own tokenization and character offsets of the same records
    from meddistill.jobs.answer_alignment import answer_char_ends

    data = load_training_records(ctx, spec.teacher.datasets, training.max_samples, training.seed)
    by_id = {r.id: r for r in data.records}
    examples = []
    for e in cached:
        record = by_id[e["id"]]
        example = tokenize_example(record, tokenizer, style, training.max_seq_length)
        n = sum(1 for t in example["labels"] if t != IGNORE)
        example["char_ends"] = answer_char_ends(tokenizer, render_target(record, style), tokenizer.eos_token or "", n)
        examples.append({**example, "topk_probs": e["topk_probs"], "teacher_char_ends": e["char_ends"].tolist()})
    return examples


def check_cache_settings(cache: Path, dist) -> None:
    """Refuse a distill-data cache made for other loss settings, or in a pre-bucket format.

    The cached buckets / probabilities are tempered, so they hold only for the temperature, topK
    and mode they were computed with (recorded in the cache's manifest config).
    """
    from meddistill.artifacts import read_manifest

    made = (read_manifest(cache).config or {}).get("distillation", {})
    for field, now in (("mode", dist.mode), ("temperature", dist.temperature), ("topK", dist.top_k)):
        if made.get(field) != now:
            raise StageError(
                f"the distill-data cache at {cache} was made with spec.distillation.{field}={made.get(field)!r}, "
                f"but the spec now says {now!r}; {RERUN}"
            )
    expected = {"logits": "bucket_logprobs", "cross-tokenizer": "char_ends"}[dist.mode]
    shards = sorted(cache.glob("shard-*.safetensors"))
    if shards:
        from safetensors import safe_open

        with safe_open(str(shards[0]), "pt") as f:
            if expected not in f.keys():
                raise StageError(
                    f"the distill-data cache at {cache} predates the current format (no {expected!r}: top-k KL now "
                    f"keeps the teacher's tail mass, ULD aligns tokens by character offsets); {RERUN}"
                )


def run(ctx: StageContext, out: Path) -> StageOutput:
    from meddistill.jobs import storage
    from meddistill.jobs.student import materialize_student_base

    spec = ctx.spec
    student = spec.student
    teacher_dir = ctx.input_dir("teacher") / "model"  # here for pruning and the tokenizer check
    base = materialize_student_base(ctx, teacher_dir, out / "base")
    derived = student.model is None
    examples = student_examples(ctx, base)
    total = tc.total_steps(len(examples), tc.ranks(student.resources), student.training)
    log.info("distill (%s): %d examples, %d steps, base %s", spec.distillation.mode, len(examples), total, base)
    config = {
        "student": student.model_dump(), "distillation": spec.distillation.model_dump(),
        "base": None if derived else base, "base_uri": storage.share_with_workers(out / "base") if derived else None,
        "adapter_base": DERIVED_BASE if derived else base,
        "teacher_uri": ctx.input_uri("teacher"), "online": spec.distillation.teacher_cache == "online",
        "total_steps": total, "out_dir": str(out), "crash_after": tc.crash_after_from_env(),
    }
    run_config = tc.run_config(out, f"{ctx.name}-distill", spec.run_policy.backoff_limit)
    result = tc.fit(distill_loop, config, examples, student.resources, run_config)
    if not (out / "adapter" / "adapter_config.json").is_file():
        raise StageError(f"distillation finished without writing {out / 'adapter'}; see the worker logs above")
    metrics = {k: result.metrics[k] for k in ("step", "loss", "ce", "kd", "resumed_from_step") if k in result.metrics}
    metrics["train_examples"] = len(examples)
    shutil.rmtree(out / "ray_train", ignore_errors=True)  # the adapter supersedes crash-recovery checkpoints
    config_out = {"student": student.model_dump(by_alias=True), "distillation": spec.distillation.model_dump(by_alias=True),
                  "base": config["adapter_base"]}
    return StageOutput(config=config_out, metrics=metrics)
