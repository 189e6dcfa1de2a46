"""Recipe: supervised fine-tuning of the teacher with Ray Train + DeepSpeed ZeRO.

Features: full / LoRA / QLoRA fine-tuning; ZeRO stage and CPU/NVMe offload from
spec.teacher.deepspeed; data-parallel ranks from spec.teacher.resources (one per GPU with nccl,
one per worker with gloo on CPU); weights and compute in training.precision; gradient
checkpointing; loss on answer tokens only; training data decontaminated against the evaluation
sets; checkpoints every `checkpointEverySteps` through Ray Train, resumed after a worker failure
or a restart.

    setup: records -> token ids (driver) -> Ray Data -> TorchTrainer(train_loop) on N workers
    train: each worker loads the model (ZeRO-3: partitioned at load, no rank holds all of it),
           wraps it in a DeepSpeed engine, then runs the shared step loop (train_loop.py)
    save:  full: 16-bit weights gathered one module at a time to rank 0 -> <artifact>/model;
           LoRA/QLoRA: <artifact>/adapter, merged once into the base -> <artifact>/model

On CPU DeepSpeed runs with DS_ACCELERATOR=cpu and torch's AdamW (`zero_force_ds_cpu_optimizer:
false`: DeepSpeedCPUAdam needs a C++ JIT build; torch AdamW on the offloaded fp32 state is exact).
QLoRA keeps the 4-bit base frozen, which ZeRO-3 cannot partition: it runs with ZeRO stage <= 2.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from meddistill.jobs import train_common as tc
from meddistill.jobs.sft_data import collate, load_training_records, tokenize_example
from meddistill.jobs.stage import StageContext, StageError, StageOutput

log = logging.getLogger(__name__)


def deepspeed_config(teacher, world: int, precision: str) -> dict:
    ds, training = teacher.deepspeed, teacher.training
    stage = ds.zero_stage
    if teacher.method == "qlora" and stage == 3:
        stage = 2  # ZeRO-3 would partition the frozen Params4bit, which bitsandbytes does not support
    zero: dict = {"stage": stage}
    if stage == 3:
        # save_final_model gathers one module at a time into a 16-bit state dict on rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
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
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }


def build_model(teacher, ds_config: dict, precision: str, device):
    """(trainable model, tokenizer) for the method: full weights, LoRA, or LoRA on a 4-bit base.

    With ZeRO-3 the weights are loaded partitioned (each rank materialises only its share, in the
    training precision): transformers switches to deepspeed.zero.Init while an HfDeepSpeedConfig
    is alive, and it holds only a weak reference, so `partitioned` must outlive from_pretrained.
    """
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from meddistill.jobs.lora import add_lora

    dtype = tc.PRECISION_DTYPES[precision]
    quant = None
    if teacher.method == "qlora":
        import torch
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, dtype))
    partitioned = None
    if ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        deepspeed.init_distributed()  # adopts Ray Train's process group: zero.Init partitions over all ranks
        partitioned = HfDeepSpeedConfig(ds_config)
    try:
        # Stages 0-2 load on the CPU; deepspeed.initialize moves the model to the worker's device.
        model, tokenizer = tc.load_training_model(
            teacher.model, dtype, device if quant is not None else _cpu(), quant, teacher.training.gradient_checkpointing)
        if teacher.method != "full":
            model = add_lora(model, teacher.lora)
    finally:
        if partitioned is not None:
            unset_hf_deepspeed_config()  # later plain loads (the LoRA merge) must not be partitioned
    model.train()
    return model, tokenizer


def _cpu():
    import torch

    return torch.device("cpu")


def train_loop(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, then the shared step loop, then the final save."""
    tc.worker_setup(config)  # config: out_dir + total_steps for the progress file
    import deepspeed

    tc.deepspeed_without_a_compiler()
    import ray.train
    import ray.train.torch
    import torch

    from meddistill.jobs.train_loop import Recipe, run_steps
    from meddistill.spec.models import Teacher

    teacher = Teacher.model_validate(config["teacher"])
    training = teacher.training
    world = ray.train.get_context().get_world_size()
    torch.manual_seed(training.seed)
    examples = tc.worker_examples()
    precision = tc.runnable_precision(training.precision, ray.train.torch.get_device(), "spec.teacher.training.precision")
    ds_config = deepspeed_config(teacher, world, precision)
    model, tokenizer = build_model(teacher, ds_config, precision, ray.train.torch.get_device())
    log.info("teacher rank %d holds %.1f MB of parameters after load (%s, ZeRO-%d)", ray.train.get_context().get_world_rank(),
             tc.resident_parameter_bytes(model) / 2**20, precision, ds_config["zero_optimization"]["stage"])
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=training.learning_rate, weight_decay=training.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tc.lr_lambda(config["total_steps"], training.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    def micro_step(batch: dict) -> dict:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the optimizer only on accumulation boundaries
        return {"loss": loss.item()}

    def load(directory: Path) -> int:
        _, client_state = engine.load_checkpoint(str(directory), tag="ds")
        return int(client_state["step"])

    recipe = Recipe(
        collate=lambda examples: collate(examples, tokenizer.pad_token_id),
        micro_step=micro_step,
        apply=lambda: None,
        save=lambda directory, step: engine.save_checkpoint(str(directory), tag="ds", client_state={"step": step}),
        load=load,
    )
    run_steps(config, training, examples, tc.worker_device(engine), recipe)
    save_final_model(engine, teacher, tokenizer, Path(config["out_dir"]) / "model", precision)


def save_final_model(engine, teacher, tokenizer, target: Path, precision: str) -> None:
    """A plain transformers model (LoRA merged) as safetensors on rank 0: what later stages load.

    full       ZeRO-3: DeepSpeed gathers one module at a time into a 16-bit (training precision)
               state dict on rank 0's CPU; no rank ever holds all parameters on its device, and
               no second model is built. Stages 0-2: every rank has the whole model already.
    lora/qlora only the adapters are gathered (small); rank 0 saves them to <artifact>/adapter,
               then merges them once into the base loaded in the training precision (for QLoRA
               that is the 16-bit base, not the 4-bit copy it trained on).
    """
    import deepspeed

    rank = engine.global_rank
    if teacher.method == "full":
        if engine.zero_optimization_partition_weights():
            # what accelerate's get_state_dict uses under ZeRO-3; a collective: every rank calls it
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = engine.module.state_dict() if rank == 0 else None
        if rank == 0:
            _write_model(engine.module, state, tokenizer, target)
        return
    from peft import get_peft_model_state_dict

    from meddistill.jobs.lora import merge_adapter, save_adapter

    adapters = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(adapters, modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(engine.module).items()} if rank == 0 else None
    if rank == 0:
        adapter_dir = target.with_name("adapter")
        save_adapter(state, engine.module.peft_config["default"], teacher.model, adapter_dir)
        merged, _ = merge_adapter(teacher.model, adapter_dir, tc.PRECISION_DTYPES[precision])
        _write_model(merged, None, tokenizer, target)


def _write_model(model, state: dict | None, tokenizer, target: Path) -> None:
    """save_pretrained (sharded safetensors) into a temporary folder, then rename it into place."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def run(ctx: StageContext, out: Path) -> StageOutput:
    from meddistill.modelsource import load_tokenizer

    teacher = ctx.spec.teacher
    training = teacher.training
    if teacher.method == "qlora" and teacher.resources.gpus_per_worker == 0:
        log.warning("qlora on CPU: bitsandbytes' CPU 4-bit kernels are slow; expect a long run")
    data = load_training_records(ctx, teacher.datasets, training.max_samples, training.seed)
    tokenizer = load_tokenizer(teacher.model)
    examples = [tokenize_example(r, tokenizer, teacher.prompt_style, training.max_seq_length) for r in data.records]
    total = tc.total_steps(len(examples), tc.ranks(teacher.resources), training)
    log.info("teacher: %d examples, %d optimizer steps on %d ranks", len(examples), total, tc.ranks(teacher.resources))
    config = {
        "teacher": teacher.model_dump(),
        "total_steps": total,
        "out_dir": str(out),
        "crash_after": tc.crash_after_from_env(),
    }
    run_config = tc.run_config(out, f"{ctx.name}-teacher", ctx.spec.run_policy.backoff_limit)
    result = tc.fit(train_loop, config, examples, teacher.resources, run_config)
    if not (out / "model" / "config.json").is_file():
        raise StageError(f"teacher training finished without writing {out / 'model'}; see the worker logs above")
    metrics = {k: result.metrics[k] for k in ("step", "loss", "resumed_from_step") if k in result.metrics}
    metrics.update(train_examples=len(examples), decontaminated=len(data.removed))
    (out / "decontamination.json").write_text(json.dumps([list(r) for r in data.removed], indent=1))
    # The final model supersedes the crash-recovery checkpoints (GBs of ZeRO optimizer state).
    shutil.rmtree(out / "ray_train", ignore_errors=True)
    return StageOutput(config=teacher.model_dump(by_alias=True), metrics=metrics, data_digest=data.digest)
