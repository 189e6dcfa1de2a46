"""Pieces both training recipes (teacher, distill) share: Ray Train wiring (one rank per GPU,
examples through Ray Data), device and precision, model loading for training, schedule,
checkpoints. The step loop itself is train_loop.py.

Checkpoints go through `ray.train.report(..., checkpoint=...)` into RunConfig(storage_path=
<artifact dir>/ray_train, name=<job>-<stage>), on S3 for an s3:// store (storage.py): a worker
restarted by FailureConfig, or a fresh trainer started later on the same storage and name (a
retried stage, on any node), gets the latest one from `ray.train.get_checkpoint()` and resumes.

Several nodes: each worker writes into its own node's working dir for the stage; on an s3:// store
rank 0 uploads what it wrote and the driver pulls it back after fit() (storage.py).

Progress: rank 0 also appends {"step", "total", "loss", "time"} to <artifact dir>/progress.jsonl
on every report, which `meddistill run` polls to draw its progress bar (Ray Train's own metrics
reach the driver only when fit() returns). The manifest never lists that file.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from meddistill.artifacts import PROGRESS
from meddistill.jobs import storage

log = logging.getLogger(__name__)
CRASH_ENV = "MEDDISTILL_CRASH_AFTER_STEP"  # fault injection for tests: rank 0 dies once after step N


def total_steps(n_examples: int, world: int, training) -> int:
    """Optimizer steps the run makes: maxSteps, else epochs over this rank's share of the data."""
    micro_per_epoch = math.ceil(math.ceil(n_examples / world) / training.batch_size)
    per_epoch = max(1, micro_per_epoch // training.gradient_accumulation_steps)
    epochs_steps = math.ceil(training.epochs * per_epoch)
    return min(training.max_steps, epochs_steps) if training.max_steps else epochs_steps


def lr_lambda(total: int, warmup_ratio: float):
    """Linear warmup then linear decay to 10% (multiplier of the peak learning rate)."""
    warmup = max(1, int(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1 - 0.9 * (step - warmup) / max(1, total - warmup))

    return factor


def ranks(resources) -> int:
    """Data-parallel ranks: one per GPU, since DeepSpeed and DDP drive one device per process (a
    Ray Train worker given 8 GPUs would use only its first), or one per worker on CPU."""
    return resources.workers * max(1, resources.gpus_per_worker)


def scaling_config(resources):
    """`workers` x `gpusPerWorker` one-GPU ranks; a worker's CPUs are shared by its ranks."""
    from ray.train import ScalingConfig

    gpus = resources.gpus_per_worker
    return ScalingConfig(
        num_workers=ranks(resources),
        use_gpu=gpus > 0,
        resources_per_worker={"CPU": resources.cpus_per_worker / max(1, gpus), "GPU": 1 if gpus else 0},
    )


def run_config(out_dir: Path, name: str, max_failures: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage_path, filesystem, worker_env = storage.checkpoint_storage(out_dir)
    return RunConfig(
        storage_path=storage_path,
        storage_filesystem=filesystem,
        worker_runtime_env=worker_env,
        name=name,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
    )


def fit(loop, config: dict, examples: list[dict], resources, run_config):
    """Run `loop` on Ray Train workers; the examples reach them through Ray Data, not the config.

    Every worker gets the whole (unsplit) dataset and keeps its share with sft_data.batches: Ray
    Data's split shards differ from run to run, and a resumed run must see the same micro-batches
    in the same order to skip exactly the ones already trained on.
    """
    import ray
    import ray.data
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    rows = [{**e, ORDER_KEY: i} for i, e in enumerate(examples)]
    scope = storage.current()
    on_s3 = scope is not None and scope.on_s3
    if on_s3:  # workers write into their own node's cache and upload from there
        config = {**config, "stage_uri": scope.uri, "driver_node": ray.get_runtime_context().get_node_id()}
        storage.forget_node_outputs(scope.uri)
    trainer = TorchTrainer(
        functools.partial(_worker, loop),
        train_loop_config=config,
        scaling_config=scaling_config(resources),
        torch_config=torch_config(resources),
        run_config=run_config,
        datasets={"train": ray.data.from_items(rows)},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if on_s3:
        scope.uploaded.update(storage.pull_node_outputs(scope.uri, Path(config["out_dir"])))
    return result


def _worker(loop, config: dict) -> None:
    """A recipe's loop on one worker, writing into this node's working dir; on an s3:// store rank 0
    then uploads what it wrote, since the driver may run on another node."""
    import ray
    import ray.train

    driver_dir = Path(config["out_dir"])
    out = storage.worker_out_dir(config)
    loop(config)
    if config.get("stage_uri") and ray.train.get_context().get_world_rank() == 0:
        storage.upload_node_outputs(out, config["stage_uri"])
        if out != driver_dir or ray.get_runtime_context().get_node_id() != config["driver_node"]:
            shutil.rmtree(out, ignore_errors=True)  # uploaded; a node's disk must not keep a copy of every model


ORDER_KEY = "_order"  # an example's index in the driver's list, restored in the worker


def worker_examples() -> list[dict]:
    """This worker's copy of the training examples, in the driver's order, tensors back as torch."""
    import ray.train

    rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda r: r[ORDER_KEY])
    return [{k: _as_tensor(k, v) for k, v in r.items() if k != ORDER_KEY} for r in rows]


def _as_tensor(key: str, value):
    """Token ids as int32 tensors (a Python list of ints costs ~9x the memory, on every rank);
    Ray Data's numpy arrays (the teacher's cached rows) back as the torch tensors they were."""
    import numpy as np
    import torch

    if key in ("input_ids", "labels"):
        return torch.as_tensor(np.asarray(value), dtype=torch.int32)
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def runnable_precision(precision: str, device, field: str) -> str:
    """The spec's training precision, or fp32 where the device cannot train in it (fp16 on CPU)."""
    if precision == "fp16" and device.type == "cpu":
        log.warning("%s=fp16 cannot train on CPU; training in fp32 (set bf16 or fp32 to silence this)", field)
        return "fp32"
    return precision


def worker_device(engine=None):
    """Where this worker's model lives and its batches must go: the DeepSpeed engine's device,
    else the one Ray Train assigned (cuda:<local rank> on GPU workers, cpu otherwise)."""
    import torch

    if engine is not None:
        return torch.device(engine.device)
    import ray.train.torch

    return ray.train.torch.get_device()


def load_training_model(src: str, dtype: str, device, quantization_config=None, gradient_checkpointing: bool = False):
    """(model, tokenizer) for training, in `dtype`, on `device`, in train mode.

    Under a live transformers HfDeepSpeedConfig with ZeRO-3, from_pretrained builds the model
    inside deepspeed.zero.Init: each rank materialises only its partition, so it is not moved
    here (DeepSpeed places the partitions). A 4-bit (QLoRA) base is quantised straight onto this
    worker's GPU. Not modelsource.load_model: that one is for inference and always ends with a
    `.to(device)` of the whole model on an absolute device index.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    from meddistill.modelsource import load_tokenizer, resolve_model_source

    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": "sdpa"}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": device} if device.type == "cuda" else None)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_source(src)), **kwargs)
    if quantization_config is None and not is_deepspeed_zero3_enabled():
        model = model.to(device)
    if gradient_checkpointing:
        model.config.use_cache = False
        # non-reentrant: works with a frozen base (LoRA) without forcing input grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, load_tokenizer(src)


def resident_parameter_bytes(model) -> int:
    """Parameter bytes this rank holds: a ZeRO-3 parameter's own partition (ds_tensor), else the
    whole tensor. Logged after load: under ZeRO-3 it is about 1/world of the model."""
    total = 0
    for p in model.parameters():
        held = getattr(p, "ds_tensor", None)
        held = p if held is None else held
        total += held.numel() * held.element_size()
    return total


def torch_config(resources):
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if resources.gpus_per_worker > 0 else "gloo")


_progress: tuple[Path, int] | None = None  # (progress file, total steps) on rank 0 of a training run


def worker_setup(config: dict | None = None) -> None:
    """Inside a worker: DeepSpeed must be told it runs on CPU before it is imported; rank 0 of a
    run whose config names out_dir and total_steps writes the progress file."""
    global _progress
    import ray.train
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _progress = None
    if config and config.get("out_dir") and ray.train.get_context().get_world_rank() == 0:
        _progress = (Path(config["out_dir"]) / PROGRESS, int(config.get("total_steps") or 0))


def deepspeed_without_a_compiler() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles its shared-memory allreduce op
    (deepspeed_shm_comm) with c++ the first time it starts, and fails where there is no compiler: the
    product image has none (`c++: not found` on the one-node cluster). Without one, mark the op
    unusable so DeepSpeed takes the gloo allreduce it falls back to on other platforms."""
    if shutil.which(os.environ.get("CXX", "c++")):
        return
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    if deepspeed.ops.__compatible_ops__.get(ShareMemCommBuilder.NAME):
        logging.getLogger("meddistill.jobs").info(
            "no C++ compiler here: DeepSpeed's shared-memory allreduce op is off, gloo does the CPU allreduce")
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def append_progress(path: Path, total: int, metrics: dict) -> None:
    """One JSON line per optimizer step; best effort (a full or read-only disk must not fail training)."""
    if "step" not in metrics:
        return
    line = {"step": metrics["step"], "total": total, "loss": metrics.get("loss"), "time": time.time()}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:
        pass


def report(metrics: dict, save=None) -> None:
    """Report metrics; with `save(dir)` also a checkpoint (every rank calls this: it is collective)."""
    import ray.train

    if _progress is not None:
        append_progress(*_progress, metrics)
    if save is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def maybe_crash(step: int, crash_after: int | None, marker_dir: Path) -> None:
    """Test hook: rank 0 exits hard once, during step N+1, after step N was checkpointed.

    Not right after the report: Ray Train's controller registers a reported checkpoint when it
    next polls the workers, so a worker dying in the same instant can lose it (a real crash
    there would resume from the checkpoint before). The pause lets the poll happen first.
    """
    import time

    import ray.train

    if crash_after is None or step != crash_after + 1 or ray.train.get_context().get_world_rank() != 0:
        return
    marker = Path(marker_dir) / f".crashed-at-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    time.sleep(5)
    os._exit(1)


def crash_after_from_env() -> int | None:
    value = os.environ.get(CRASH_ENV)
    return int(value) if value else None
