"""Removing the children of MedDistillJobs that are gone, on every backend (level-triggered).

KubeRay children carry owner references, so the garbage collector removes them; a Ray cluster's
jobs and Serve apps carry none, so the operator compares what each backend runs with the jobs that
still exist, on a job's DELETED event and in every resync.
"""

from __future__ import annotations

import logging

from kubernetes.client.exceptions import ApiException

from meddistill.spec.models import API_GROUP, API_VERSION, PLURAL

from . import backends
from .failures import ReconcileBlocked
from .job_writes import custom_api

log = logging.getLogger("meddistill.operator")


def list_jobs(namespace: str | None) -> dict[tuple[str, str], str]:
    """(namespace, name) -> uid of every MedDistillJob in `namespace` (None: all namespaces)."""
    api = custom_api()
    if namespace:
        items = api.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)["items"]
    else:
        items = api.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)["items"]
    return {(o["metadata"]["namespace"], o["metadata"]["name"]): o["metadata"]["uid"] for o in items}


def collect_garbage(ray_address: str, namespace: str | None) -> None:
    """Remove the children of jobs that are gone (or were stopped); a failure waits for the next resync."""
    for backend in backends.every_backend(ray_address):
        try:
            for what in backend.collect_garbage(lambda: list_jobs(namespace), namespace):
                log.info("removed %s: its MedDistillJob is gone (or was stopped)", what)
        except (ReconcileBlocked, ApiException, OSError, RuntimeError) as e:
            log.warning("garbage collection failed, retrying next resync: %s", e)
