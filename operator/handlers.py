"""kopf handlers: read -> plan -> write. All decisions are in planner.py, all children in backends/.

Every trigger (a MedDistillJob event, an event of one of its labelled RayJobs/RayServices, the
periodic resync, a retry's backoff ending) ends in `reconcile(namespace, name)`: read the job fresh,
observe its children through its backend and its artifacts, `plan()`, let the backend apply the
plan, write the status whole. What the job's owner must unblock (ReconcileBlocked: a foreign child,
a refused create, an unreadable store) becomes a condition and a Warning event naming cause and fix.

No finalizer: kopf only adds one for deletion handlers, timers and daemons, and this module has
none of them (the periodic resync is a plain asyncio task started at startup). Deleting a job
therefore never waits for the operator (garbage.py removes what owner references cannot). kopf's
progress/diff-base annotations are not used either: `on.event` handlers are level-triggered and
stateless, exactly what a pure planner wants.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from meddistill.spec.models import API_GROUP, API_VERSION, KIND, PLURAL, MedDistillJob, MedDistillJobStatus

from . import backends, garbage, metrics, peering, served_lineage, serving_gate
from .backends.kuberay_objects import LABEL_JOB, RAY_GROUP, RAY_VERSION, RAYJOBS, RAYSERVICES
from .failures import ReconcileBlocked
from .job_writes import custom_api, post_event, refuse, write_blocked, write_status
from .planner import plan
from .stage_artifacts import readable_store, with_artifacts

log = logging.getLogger("meddistill.operator")


class Config:
    """Set by `meddistill operator` before kopf starts."""

    namespace: str | None = None  # None: all namespaces
    resync_seconds: float = 30.0
    ray_address: str = ""  # jobs whose spec.ray.address is empty run here; empty: KubeRay
    peering: str = ""  # kopf peering object (high availability, peering.py); empty: standalone
    peering_priority: int = 0
    peering_lifetime: int = 60


# Job events, child events and timers run concurrently in kopf's thread pool: one reconcile per job.
_locks: dict[tuple[str, str], threading.Lock] = {}
_timers: dict[tuple[str, str], threading.Timer] = {}
_locks_guard = threading.Lock()


def reconcile(namespace: str, name: str) -> None:
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        started = time.monotonic()
        try:
            _reconcile(namespace, name)
            metrics.RECONCILES.labels("ok").inc()
        except ApiException as e:
            metrics.RECONCILES.labels(f"api_{e.status}").inc()
            if e.status == 403 and "NamespaceTerminating" in str(e.body):
                return  # the namespace (and the job with it) is going away
            if e.status == 409:  # our status write lost a race: the next event re-plans
                log.info("%s/%s: conflict writing status; will re-plan", namespace, name)
                return
            log.error("%s/%s: reconcile failed: %s %s", namespace, name, e.status, e.reason)
        except Exception:
            metrics.RECONCILES.labels("error").inc()
            log.exception("%s/%s: reconcile failed", namespace, name)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


def _reconcile(namespace: str, name: str) -> None:
    try:
        body = custom_api().get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return  # deleted: the garbage collector removes its children
        raise
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return
    try:
        job = MedDistillJob.model_validate({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body})
    except ValidationError as e:
        refuse(body, e)
        return
    try:
        job.status = MedDistillJobStatus.model_validate(body.get("status") or {})
    except ValidationError as e:
        # Not the user's fault: re-plan from the children alone (recorded stages are re-read
        # from their manifests) instead of failing the job.
        log.warning("%s/%s: ignoring an unreadable status: %s", namespace, name, e)
    try:
        backend = backends.for_job(job, Config.ray_address)
        with readable_store():
            observed = with_artifacts(job, replace(backend.observe(job, meta["uid"]), target=backend.endpoint(job)))
            observed = replace(observed, lineage=served_lineage.check(job, observed))  # re-hashed before serving
        p = plan(job, observed, datetime.now(timezone.utc))
        backend.apply(job, meta["uid"], p)
    except ReconcileBlocked as e:
        metrics.RECONCILES.labels("blocked").inc()
        write_blocked(body, job, e)
        return
    if write_status(body, p.status):
        log.info("%s/%s: phase %s stage %s", namespace, name, p.status["phase"], p.status.get("currentStage") or "-")
    for ev in p.events:
        post_event(body, ev.type, ev.reason, ev.message)
    if p.requeue_after is not None:
        _requeue(namespace, name, p.requeue_after)


def _requeue(namespace: str, name: str, seconds: float) -> None:
    """Reconcile when a retry's backoff ends, not at the next resync (one pending timer per job)."""
    with _locks_guard:
        if (old := _timers.get((namespace, name))) is not None:
            old.cancel()
        timer = _timers[(namespace, name)] = threading.Timer(seconds + 0.5, reconcile, (namespace, name))
        timer.daemon = True
        timer.start()


# -- kopf wiring: every trigger ends in reconcile() ------------------------------------------


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    if Config.peering:  # replicas: the one with the highest priority runs (peering.py)
        settings.peering.name, settings.peering.mandatory = Config.peering, True
        settings.peering.priority, settings.peering.lifetime = Config.peering_priority, Config.peering_lifetime
        settings.peering.clusterwide = not Config.namespace
    else:
        settings.peering.standalone = True  # one replica; no KopfPeering objects, no RBAC for them
    # No watching of CRDs/namespaces (no RBAC for them): our CRD and KubeRay's exist before we start.
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING  # our own Events describe transitions
    settings.watching.server_timeout = 300
    memo.resync = asyncio.get_running_loop().create_task(_resync_forever())


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_) -> None:
    task = memo.get("resync")
    if task:
        task.cancel()


def _echo_of_own_write(type: str | None, body: kopf.Body) -> bool:
    """Events that only echo what this operator just wrote (skipping them halves API traffic): a job
    MODIFIED whose status reflects its generation (a spec change bumps it), a child ADDED without
    status. The initial listing (type None) is always reconciled; the resync backs up the rest."""
    if type == "MODIFIED" and body.get("kind") == KIND:
        status = body.get("status") or {}
        return (status.get("observedGeneration") == body.metadata.get("generation")
                and not serving_gate.override_pending(body.metadata.get("annotations"), status))
    return type == "ADDED" and body.get("kind") != KIND and not body.get("status")


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def on_job_event(type: str | None, body: kopf.Body, **_) -> None:
    # Covers create, update, resume (the initial listing) alike.
    if type == "DELETED":
        garbage.collect_garbage(Config.ray_address, Config.namespace)  # a Ray cluster's children have no owner refs
        return
    if _echo_of_own_write(type, body):
        return
    reconcile(body.metadata.namespace, body.metadata.name)


@kopf.on.event(RAY_GROUP, RAY_VERSION, RAYJOBS, labels={LABEL_JOB: kopf.PRESENT}, id="rayjob-event")
@kopf.on.event(RAY_GROUP, RAY_VERSION, RAYSERVICES, labels={LABEL_JOB: kopf.PRESENT}, id="rayservice-event")
def on_child_event(type: str | None, body: kopf.Body, **_) -> None:
    if not _echo_of_own_write(type, body):
        reconcile(body.metadata.namespace, body.metadata.labels[LABEL_JOB])


async def _resync_forever() -> None:
    """Backstop: re-plan every job periodically (artifacts may appear without any k8s event)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(Config.resync_seconds)
        try:
            if not await loop.run_in_executor(None, peering.is_active, custom_api(), Config.peering, Config.namespace,
                                              Config.peering_priority):
                continue  # a standby replica: kopf has paused its watches, and so does its resync
            jobs = await loop.run_in_executor(None, garbage.list_jobs, Config.namespace)
        except Exception as e:
            log.warning("resync: cannot list %s: %s", PLURAL, e)
            continue
        for ns, name in jobs:
            await loop.run_in_executor(None, reconcile, ns, name)
        await loop.run_in_executor(None, garbage.collect_garbage, Config.ray_address, Config.namespace)
        metrics.RESYNCS.inc()
