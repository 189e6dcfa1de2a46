"""Pieces both training recipes (teacher, distill) share: Ray Train wiring, schedule, checkpoints.

Checkpoints go through `ray.train.report(..., checkpoint=...)` into RunConfig(storage_path=
<artifact dir>/ray_train, name=<job>-<stage>): a worker restarted by FailureConfig, or a fresh
trainer started later on the same storage and name, gets the latest one from
`ray.train.get_checkpoint()` and resumes at its step.

Progress: rank 0 also appends {"step", "total", "loss", "time"} to <artifact dir>/progress.jsonl
on every report, which `meddistill run` polls to draw its progress bar (Ray Train's own metrics
reach the driver only when fit() returns). The manifest never lists that file.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from meddistill.artifacts import PROGRESS

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


def scaling_config(resources):
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=resources.workers,
        use_gpu=resources.gpus_per_worker > 0,
        resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
    )


def run_config(out_dir: Path, name: str, max_failures: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        storage_path=str(Path(out_dir) / "ray_train"),
        name=name,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
    )


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
