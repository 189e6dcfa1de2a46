"""The Ray clusters the platform team allows (`meddistill operator --ray-clusters FILE`, the chart's
`rayClusters`), and which one a job may use.

The operator sends a cluster's token and a job's Secrets to the cluster a job runs on, so a job
author never chooses an address: a job names a listed cluster (spec.ray.cluster), or gives the
address of one (spec.ray.address), or gets the operator's default. Anything else is refused with a
condition *before* any request is made. A token travels only over https unless the entry says
`allowInsecure: true` (a cluster on a private network the platform team vouches for).

The file (YAML or JSON):

    clusters:
      - name: shared
        address: https://ray-head.ray.svc:8265
        tokenSecret: {name: ray-token, key: token}   # in the operator's namespace (optional)
        allowInsecure: false
        namespaces: [team-a]                         # whose jobs may use it (optional; empty: any)

Ray has no tenants: every holder of a cluster's token can submit code there and read every job's and
Serve app's runtime_env. So a job's Secret values (artifacts.secretName) go only to a cluster listed for
exactly the job's namespace (`single_tenant`); on a shared one the job is refused with the fix (node
credentials, or a cluster of its own), and the serving token only ever travels as its SHA-256.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from meddistill.spec.models import MedDistillJob

from ..failures import RAY_CLUSTER_UNAVAILABLE, ReconcileBlocked


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class TokenSecret(_Model):
    name: str = Field(..., min_length=1)
    key: str = "token"
    namespace: str = ""  # default: the operator's own namespace (set when the file is loaded)


class AllowedCluster(_Model):
    name: str = Field(..., pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    address: str = Field(..., pattern=r"^https?://.+")
    token_secret: TokenSecret | None = None
    allow_insecure: bool = False
    namespaces: tuple[str, ...] = ()  # whose jobs may use it; empty: any namespace (a tuple: the model is hashed)

    @property
    def single_tenant(self) -> bool:
        return len(set(self.namespaces)) == 1

    def tenants(self) -> str:
        return f"namespaces {', '.join(self.namespaces)}" if self.namespaces else "any namespace"

    @model_validator(mode="after")
    def _token_over_tls(self) -> "AllowedCluster":
        if self.token_secret and self.address.startswith("http://") and not self.allow_insecure:
            raise ValueError(f"Ray cluster {self.name!r}: its token would be sent in clear text to {self.address}; "
                             f"use an https:// address, or set allowInsecure: true if the network is private")
        return self

    @property
    def key(self) -> str:
        return self.address.rstrip("/")


class AllowedClusters(_Model):
    clusters: list[AllowedCluster] = Field(default_factory=list)
    default: str = ""  # the cluster of jobs that name none; empty: KubeRay

    @model_validator(mode="after")
    def _names(self) -> "AllowedClusters":
        names = [c.name for c in self.clusters]
        if len(set(names)) != len(names):
            raise ValueError(f"Ray cluster names must be unique: {names}")
        if self.default and self.default not in names:
            raise ValueError(f"default Ray cluster {self.default!r} is not listed ({', '.join(names) or 'none'})")
        return self

    def by_name(self, name: str) -> AllowedCluster | None:
        return next((c for c in self.clusters if c.name == name), None)

    def by_address(self, address: str) -> AllowedCluster | None:
        return next((c for c in self.clusters if c.key == address.rstrip("/")), None)


def load(path: str | Path, operator_namespace: str) -> AllowedClusters:
    """Read and check the file; token Secrets without a namespace are in the operator's."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    parsed = AllowedClusters.model_validate(data)
    clusters = [c.model_copy(update={"token_secret": c.token_secret.model_copy(update={"namespace": operator_namespace})})
                if c.token_secret and not c.token_secret.namespace else c for c in parsed.clusters]
    return parsed.model_copy(update={"clusters": clusters})


ALLOWED = AllowedClusters()  # replaced by `meddistill operator` at startup (configure)


def configure(allowed: AllowedClusters) -> None:
    global ALLOWED
    ALLOWED = allowed


def for_job(job: MedDistillJob, default: str = "") -> AllowedCluster | None:
    """The listed cluster this job runs on, None for KubeRay; ReconcileBlocked (nothing sent) otherwise."""
    found = _listed_for(job, default)
    ns = job.metadata.namespace
    if found is not None and found.namespaces and ns not in found.namespaces:
        raise ReconcileBlocked(
            f"Ray cluster {found.name!r} takes jobs from {found.tenants()} only, not from namespace {ns!r}: name "
            f"another cluster in spec.ray.cluster (or none, for KubeRay), or ask the platform team to add {ns} to "
            f"the chart's rayClusters[].namespaces", RAY_CLUSTER_UNAVAILABLE)
    return found


def _listed_for(job: MedDistillJob, default: str) -> AllowedCluster | None:
    ray = job.spec.ray
    listed = ", ".join(c.name for c in ALLOWED.clusters) or "none"
    if ray.cluster:
        found = ALLOWED.by_name(ray.cluster)
        if found is None:
            raise ReconcileBlocked(
                f"spec.ray.cluster {ray.cluster!r} is not a Ray cluster this operator may use (listed: {listed}); "
                f"name a listed one, or ask the platform team to add it to the chart's rayClusters", RAY_CLUSTER_UNAVAILABLE)
        return found
    if ray.address:
        found = ALLOWED.by_address(ray.address)
        if found is None:
            raise ReconcileBlocked(
                f"spec.ray.address {ray.address!r} is not the address of a Ray cluster this operator may use "
                f"(listed: {listed}); set spec.ray.cluster to a listed name instead, or ask the platform team to "
                f"add the cluster to the chart's rayClusters", RAY_CLUSTER_UNAVAILABLE)
        return found
    default = default or ALLOWED.default
    if default and ALLOWED.by_name(default) is None:
        raise ReconcileBlocked(f"the operator's default Ray cluster {default!r} is not listed ({listed}); "
                               f"fix the chart's ray.defaultCluster", RAY_CLUSTER_UNAVAILABLE)
    return ALLOWED.by_name(default) if default else None
