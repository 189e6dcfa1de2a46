"""The one step loop both training recipes (teacher, distill) run inside a Ray Train worker.

    resume  the latest Ray Train checkpoint, if any, gives the step to start at; the micro-batches
            already trained on are skipped, so a resumed run sees the same data in the same order
    step    collate -> batch onto the model's device -> recipe's micro_step (forward + backward)
            -> every gradientAccumulationSteps micro-batches, the recipe's apply (optimizer step)
    report  every optimizer step (metrics + progress file); a checkpoint every checkpointEverySteps
            and at the last step; the crash hook for the fault-injection tests

A recipe brings only what differs: how one micro-batch's loss is made and backpropagated, how the
optimizer steps, and how its state is saved and loaded.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from meddistill.jobs import train_common as tc
from meddistill.jobs.sft_data import batches


@dataclass
class Recipe:
    collate: Callable[[list[dict]], dict]  # examples -> CPU tensors
    micro_step: Callable[[dict], dict[str, float]]  # batch on the device -> {"loss": ..., ...}, after backward
    apply: Callable[[], None]  # the optimizer step at an accumulation boundary
    save: Callable[[Path, int], None]  # (directory, step): write a checkpoint (every rank calls it)
    load: Callable[[Path], int]  # directory -> the step it was saved at


def to_device(batch: dict, device) -> dict:
    """Every tensor of a batch on the model's device (non-tensors unchanged)."""
    import torch

    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_steps(config: dict, training, examples: list[dict], device, recipe: Recipe) -> int:
    """Train to config["total_steps"] optimizer steps; returns the step it resumed from."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start_step = recipe.load(Path(d))
    gas, total = training.gradient_accumulation_steps, config["total_steps"]
    micro_batches = (
        b for epoch in itertools.count()
        for b in batches(examples, training.batch_size, rank, world, training.seed, epoch)
    )
    micro_batches = itertools.islice(micro_batches, start_step * gas, None)  # resume mid-epoch

    step, acc = start_step, []
    while step < total:
        acc.append(recipe.micro_step(to_device(recipe.collate(next(micro_batches)), device)))
        if len(acc) < gas:
            continue
        recipe.apply()
        step += 1
        metrics = {"step": step, **{k: sum(a[k] for a in acc) / len(acc) for k in acc[0]}, "resumed_from_step": start_step}
        acc = []
        tc.maybe_crash(step, config.get("crash_after"), Path(config["out_dir"]))
        if step % training.checkpoint_every_steps == 0 or step == total:
            tc.report(metrics, save=lambda d, at=step: recipe.save(d, at))
        else:
            tc.report(metrics)
    return start_step
