"""Where a job's children run: one small protocol, two implementations.

- KubeRay (kuberay.py): a RayJob per stage attempt and a RayService, the default;
- an existing Ray cluster (raycluster.py): Ray Jobs API submissions and a Serve app, when
  spec.ray.address (or the operator's --ray-address) is set.

Like KubeRay's injected dashboard client, the reconcile only calls this protocol: nothing outside
this package branches on which backend runs. Backend-neutral pieces (entrypoint, job document, the
keys tying a child to its job) are in common.py; what a stage reserves is in ../sizing.py.
"""

from __future__ import annotations

from typing import Callable, Protocol

from meddistill.spec.models import MedDistillJob

from ..planner import Observed, Plan, ServingTarget
from . import raycluster
from .kuberay import KubeRayBackend


class Backend(Protocol):
    def observe(self, job: MedDistillJob, uid: str) -> Observed:
        """The job's children (owned by `uid`) as the planner sees them; artifacts are read elsewhere."""

    def endpoint(self, job: MedDistillJob) -> ServingTarget:
        """The serving app's child name and the OpenAI base URL it answers at."""

    def apply(self, job: MedDistillJob, uid: str, plan: Plan) -> None:
        """Create, update and delete what the plan says; ReconcileBlocked names what stops it."""

    def collect_garbage(self, list_live: Callable[[], dict[tuple[str, str], str]], namespace: str | None) -> list[str]:
        """Remove children whose job is gone (list_live: (ns, name) -> uid); returns what it removed."""


def for_job(job: MedDistillJob, default_ray_address: str = "") -> Backend:
    """The job's spec.ray.address, else the operator's --ray-address, else KubeRay."""
    address = job.spec.ray.address or default_ray_address
    return raycluster.RayClusterBackend(raycluster.cluster(address)) if address else KubeRayBackend()


def every_backend(default_ray_address: str = "") -> list[Backend]:
    """The backends that may hold children: KubeRay and every Ray cluster a job used (for garbage collection)."""
    if default_ray_address:
        raycluster.cluster(default_ray_address)  # known from the start, even before any job used it
    return [KubeRayBackend(), *(raycluster.RayClusterBackend(c) for c in raycluster.known_clusters())]
