"""Recipe: supervised fine-tuning of the teacher with Ray Train + DeepSpeed ZeRO.

Features: full / LoRA / QLoRA fine-tuning; ZeRO stage and CPU/NVMe offload from
spec.teacher.deepspeed; data-parallel workers from spec.teacher.resources (gloo on CPU); loss on
answer tokens only; training data decontaminated against the evaluation sets; checkpoints every
`checkpointEverySteps` through Ray Train, resumed after a worker failure or a restart.

    setup: records -> token ids (driver) -> TorchTrainer(train_loop) on N workers
    train: each worker loads the model, wraps it in a DeepSpeed engine, resumes from the latest
           checkpoint if there is one, steps, checkpoints
    save:  ZeRO-3 shards gathered to rank 0 -> <artifact>/model (safetensors, LoRA merged)

On CPU DeepSpeed runs with DS_ACCELERATOR=cpu and torch's AdamW (`zero_force_ds_cpu_optimizer:
false`: DeepSpeedCPUAdam needs a C++ JIT build; torch AdamW on the offloaded fp32 state is exact).
QLoRA keeps the 4-bit base frozen, which ZeRO-3 cannot partition: it runs with ZeRO stage <= 2.
"""
from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

from meddistill.jobs import train_common as tc
from meddistill.jobs.sft_data import batches, collate, load_training_records, tokenize_example
from meddistill.jobs.stage import StageContext, StageError, StageOutput

log = logging.getLogger(__name__)


def deepspeed_config(teacher, world: int) -> dict:
    ds, training = teacher.deepspeed, teacher.training
    stage = ds.zero_stage
    if teacher.method == "qlora" and stage == 3:
        stage = 2  # ZeRO-3 would partition the frozen Params4bit, which bitsandbytes does not support
    zero: dict = {"stage": stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "nvme_path": ds.nvme_path or None}
    if ds.offload_params != "none" and stage == 3:
        zero["offload_param"] = {"device": ds.offload_params, "nvme_path": ds.nvme_path or None}
    return {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.batch_size * training.gradient_accumulation_steps * world,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {"enabled": training.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }


def _build_model(config: dict):
    """The trainable model for the method (full weights, LoRA, or LoRA on a 4-bit base)."""
    from meddistill.modelsource import load_model

    quant = None
    if config["method"] == "qlora":
        import torch
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model, tokenizer = load_model(config["model"], dtype="float32", quantization_config=quant)
    if config["method"] != "full":
        from peft import LoraConfig, get_peft_model

        lora = config["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"], task_type="CAUSAL_LM",
        ))
    model.train()
    return model, tokenizer


def train_loop(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, resume, step, checkpoint, save."""
    tc.worker_setup(config)  # config: out_dir + total_steps for the progress file
    import deepspeed
    import ray.train
    import torch

    from meddistill.spec.models import Teacher

    teacher = Teacher.model_validate(config["teacher"])
    training = teacher.training
    world = ray.train.get_context().get_world_size()
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(training.seed)
    model, tokenizer = _build_model(config)
    total = config["total_steps"]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=training.learning_rate, weight_decay=training.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tc.lr_lambda(total, training.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(teacher, world)
    )

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client_state = engine.load_checkpoint(d, tag="ds")
        start_step = int(client_state["step"])
    gas = training.gradient_accumulation_steps
    micro_batches = (
        b for epoch in itertools.count()
        for b in batches(config["examples"], training.batch_size, rank, world, training.seed, epoch)
    )
    micro_batches = itertools.islice(micro_batches, start_step * gas, None)  # resume mid-epoch

    step, losses = start_step, []
    while step < total:
        batch = collate(next(micro_batches), tokenizer.pad_token_id)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the optimizer only on accumulation boundaries
        losses.append(loss.item())
        if len(losses) < gas:
            continue
        step += 1
        tc.maybe_crash(step, config.get("crash_after"), Path(config["out_dir"]))
        metrics = {"step": step, "loss": sum(losses) / len(losses), "resumed_from_step": start_step}
        losses = []
        if step % training.checkpoint_every_steps == 0 or step == total:
            tc.report(metrics, save=lambda d: engine.save_checkpoint(str(d), tag="ds", client_state={"step": step}))
        else:
            tc.report(metrics)

    # ZeRO-3 holds a slice of each parameter per rank: gather whole tensors, rank 0 writes them.
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        save_final_model(config, state, tokenizer, Path(config["out_dir"]) / "model")


def save_final_model(config: dict, state: dict, tokenizer, target: Path) -> None:
    """A plain transformers model (LoRA merged) as safetensors: what later stages load."""
    model, _ = _build_model({**config, "method": "lora" if config["method"] != "full" else "full"})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"teacher checkpoint has keys the model lacks: {unexpected[:5]}")
    if config["method"] != "full":
        model = model.merge_and_unload()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def run(ctx: StageContext, out: Path) -> StageOutput:
    from ray.train.torch import TorchTrainer

    from meddistill.modelsource import load_tokenizer

    teacher = ctx.spec.teacher
    training = teacher.training
    if teacher.method == "qlora" and teacher.resources.gpus_per_worker == 0:
        log.warning("qlora on CPU: bitsandbytes' CPU 4-bit kernels are slow; expect a long run")
    data = load_training_records(ctx, teacher.datasets, training.max_samples, training.seed)
    tokenizer = load_tokenizer(teacher.model)
    examples = [tokenize_example(r, tokenizer, teacher.prompt_style, training.max_seq_length) for r in data.records]
    total = tc.total_steps(len(examples), teacher.resources.workers, training)
    log.info("teacher: %d examples, %d optimizer steps on %d workers", len(examples), total, teacher.resources.workers)
    config = {
        "teacher": teacher.model_dump(),
        "model": teacher.model,
        "method": teacher.method,
        "lora": teacher.lora.model_dump() if teacher.lora else None,
        "examples": examples,
        "total_steps": total,
        "out_dir": str(out),
        "crash_after": tc.crash_after_from_env(),
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=tc.scaling_config(teacher.resources),
        torch_config=tc.torch_config(teacher.resources),
        run_config=tc.run_config(out, f"{ctx.name}-teacher", ctx.spec.run_policy.backoff_limit),
    )
    result = trainer.fit()
    if not (out / "model" / "config.json").is_file():
        raise StageError(f"teacher training finished without writing {out / 'model'}; see the worker logs above")
    metrics = {k: result.metrics[k] for k in ("step", "loss", "resumed_from_step") if k in result.metrics}
    metrics.update(train_examples=len(examples), decontaminated=len(data.removed))
    (out / "decontamination.json").write_text(json.dumps([list(r) for r in data.removed], indent=1))
    # The final model supersedes the crash-recovery checkpoints (GBs of ZeRO optimizer state).
    shutil.rmtree(out / "ray_train", ignore_errors=True)
    return StageOutput(config=teacher.model_dump(by_alias=True), metrics=metrics, data_digest=data.digest)
