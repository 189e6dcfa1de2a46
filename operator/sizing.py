"""What a stage run reserves, the same numbers for both backends (KubeRay RayJob, Ray Jobs API).

`stage_resources` says which spec section sizes a stage's workers; `entrypoint_resources` says what
the stage's driver process (`python -m meddistill.jobs STAGE`) reserves for itself. The driver of a
stage that only coordinates (Ray Train workers, Ray tasks that reserve the stage's resources) asks
for nothing: reserving the workers' resources a second time would deadlock a cluster sized for
exactly those workers. Quantize does its work in the driver, so it reserves one worker's share.
Torch-free and backend-free: both backends import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from meddistill.spec.models import MedDistillJob, Resources

# Stages whose driver process does the work itself (loads and quantizes the model).
DRIVER_DOES_THE_WORK = frozenset({"quantize"})
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


@dataclass(frozen=True)
class EntrypointResources:
    """What the stage's driver reserves: Ray's entrypoint_num_cpus / _num_gpus / _memory."""

    num_cpus: int = 0
    num_gpus: int = 0
    memory_bytes: int = 0


def memory_bytes(quantity: str) -> int:
    """A Kubernetes quantity (8Gi, 500M, 1024) in bytes."""
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * _UNITS[suffix])
    return int(float(quantity))


def stage_resources(job: MedDistillJob, stage: str) -> Resources:
    """Which section's resources a stage runs with."""
    spec = job.spec
    if stage in ("teacher", "distill-data"):
        return spec.teacher.resources
    if stage == "distill":
        return spec.student.resources
    # quantize and evaluate load one model at a time on one worker (evaluate loads the teacher too).
    t = spec.teacher.resources
    return Resources(workers=1, gpus_per_worker=t.gpus_per_worker, cpus_per_worker=t.cpus_per_worker, memory=t.memory)


def entrypoint_resources(job: MedDistillJob, stage: str) -> EntrypointResources:
    """The driver's reservation: one worker's share where the driver does the work, else nothing."""
    if stage not in DRIVER_DOES_THE_WORK:
        return EntrypointResources()
    res = stage_resources(job, stage)
    return EntrypointResources(res.cpus_per_worker, res.gpus_per_worker, memory_bytes(res.memory))
