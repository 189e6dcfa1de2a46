"""Where a job's children run: one small protocol, two implementations.

- KubeRay (kuberay.py): a RayJob per stage attempt and a RayService, the default;
- an existing Ray cluster (raycluster.py): Ray Jobs API submissions and a Serve app, on a cluster
  the platform team listed (ray_clusters.py) that the job names, or the operator's default one.

Like KubeRay's injected dashboard client, the reconcile only calls this protocol: nothing outside
this package branches on which backend runs. Backend-neutral pieces (entrypoint, job document, the
keys tying a child to its job) are in common.py; what a stage reserves is in ../sizing.py.
"""

from __future__ import annotations

from typing import Callable, Protocol

from meddistill.spec.models import MedDistillJob

from ..planner import Observed, Plan, ServingTarget
from . import ray_clusters, raycluster
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


def for_job(job: MedDistillJob, default_cluster: str = "") -> Backend:
    """The listed Ray cluster the job names (ray_clusters.py; anything unlisted is ReconcileBlocked before any
    request), else the default cluster (this argument, else the --ray-clusters file's), else KubeRay."""
    allowed = ray_clusters.for_job(job, default_cluster)
    return raycluster.RayClusterBackend(raycluster.cluster(allowed)) if allowed else KubeRayBackend()


def every_backend(default_cluster: str = "") -> list[Backend]:
    """The backends that may hold children: KubeRay and every listed Ray cluster (for garbage collection)."""
    return [KubeRayBackend(), *(raycluster.RayClusterBackend(raycluster.cluster(c)) for c in ray_clusters.ALLOWED.clusters)]
