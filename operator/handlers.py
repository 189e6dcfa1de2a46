"""kopf handlers: read -> plan -> write. All decisions are in planner.py.

Every trigger (a MedDistillJob event, an event of one of its labelled RayJobs/RayServices, the
periodic resync) ends in `reconcile(namespace, name)`, which reads the job and its children
fresh from the API server, calls `plan()`, applies the plan and writes the status whole.

Two backends, one planner: KubeRay (RayJobs/RayService, kuberay.py) by default, or an existing
Ray cluster (Jobs API + Serve REST API, raybackend.py) when spec.ray.address (or the operator's
--ray-address) is set.

No finalizer: kopf only adds one for deletion handlers, timers and daemons, and this module has
none of them (the periodic resync is a plain asyncio task started at startup). Deleting a job
therefore never waits for the operator; owner references let the garbage collector remove its
KubeRay children, and for a Ray cluster the operator collects its own garbage (on the job's
DELETED event, and level-triggered in every resync). kopf's own progress/diff-base annotations
are not used either: `on.event` handlers are level-triggered and stateless, exactly what a pure
planner wants.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from meddistill import artifacts
from meddistill.spec.models import API_GROUP, API_VERSION, KIND, PLURAL, MedDistillJob, MedDistillJobStatus

from . import kuberay, metrics, raybackend, served_lineage
from .planner import ArtifactRecord, Observed, Plan, StageRun, StartStage, plan, rfc3339

log = logging.getLogger("meddistill.operator")


class Config:
    """Set by `meddistill operator` before kopf starts."""

    namespace: str | None = None  # None: all namespaces
    resync_seconds: float = 30.0
    ray_address: str = ""  # jobs whose spec.ray.address is empty run here; empty: KubeRay


def ray_cluster(job: MedDistillJob) -> raybackend.RayCluster | None:
    """The Ray cluster a job runs on, or None for the KubeRay backend."""
    address = job.spec.ray.address or Config.ray_address
    return raybackend.cluster(address) if address else None


_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(key: tuple[str, str]) -> threading.Lock:
    # Job events and child events run concurrently in kopf's thread pool: one reconcile per job.
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi()


# --------------------------------------------------------------------------------------------
# Observe
# --------------------------------------------------------------------------------------------


def _read_artifact(job: MedDistillJob, stage: str) -> ArtifactRecord | None:
    """The stage's manifest (and results.json for evaluate) through the artifact store."""
    uri = artifacts.stage_uri(job.spec.artifacts.uri, job.metadata.name, stage)
    # Only the manifest (and the results table): never a stage's model weights into the operator.
    directory = artifacts.ArtifactStore(uri).fetch(only={"results.json"} if stage == "evaluate" else set())
    if directory is None:
        return None
    manifest = artifacts.read_manifest(directory)
    if manifest is None:
        return None
    results = None
    if stage == "evaluate":
        path = Path(directory) / "results.json"
        if not path.is_file():
            return None  # the evaluate artifact is not complete without its table
        import json

        results = json.loads(path.read_text())
    return ArtifactRecord(uri=uri, digest=manifest.digest, results=results)


def _with_artifacts(job: MedDistillJob, runs: list[StageRun]) -> list[StageRun]:
    recorded = {s.name for s in (job.status.stages if job.status else []) if s.state == "Succeeded" and s.artifact_digest}
    return [StageRun(**{**r.__dict__, "artifact": _read_artifact(job, r.stage)})
            if r.state == "Succeeded" and r.stage not in recorded else r for r in runs]


def observe(job: MedDistillJob, uid: str) -> Observed:
    ns, name = job.metadata.namespace, job.metadata.name
    ray = ray_cluster(job)
    if ray is not None:
        return Observed(runs=tuple(_with_artifacts(job, ray.runs(ns, name, uid))), serving=ray.serving(ns, name))
    selector = f"{kuberay.LABEL_JOB}={name}"
    api = _custom()

    def ours(obj: dict) -> bool:  # a re-created job with the same name must not adopt old children
        return any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences") or [])

    runs = [run for obj in api.list_namespaced_custom_object(kuberay.RAY_GROUP, kuberay.RAY_VERSION, ns, kuberay.RAYJOBS,
                                                             label_selector=selector)["items"]
            if ours(obj) and (run := kuberay.stage_run(obj)) is not None]
    services = [o for o in api.list_namespaced_custom_object(kuberay.RAY_GROUP, kuberay.RAY_VERSION, ns,
                                                             kuberay.RAYSERVICES, label_selector=selector)["items"]
                if ours(o)]
    return Observed(runs=tuple(_with_artifacts(job, runs)), serving=kuberay.serving_app(services[0]) if services else None)


# --------------------------------------------------------------------------------------------
# Write
# --------------------------------------------------------------------------------------------


def _forbidden(e: ApiException, verb: str, what: str) -> None:
    if e.status == 403 and "NamespaceTerminating" in str(e.body):
        log.info("cannot %s %s: its namespace is being deleted", verb, what)
    elif e.status == 403:
        log.error("403 Forbidden: cannot %s %s: the operator's RBAC role is missing this permission "
                  "(check the chart's ClusterRole/Role): %s", verb, what, e.body)


_secret_warned: dict[tuple[str, str], str] = {}  # (ns, name) -> the SecretUnavailable message last posted


def _read_secret(namespace: str, name: str, field: str) -> dict[str, str]:
    try:
        secret = client.CoreV1Api().read_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status == 404:
            raise raybackend.SecretUnavailable(
                f"Secret {namespace}/{name} (named by {field}) does not exist: create it in the job's namespace, "
                f"e.g. kubectl -n {namespace} create secret generic {name} --from-literal=...") from None
        if e.status == 403:
            raise raybackend.SecretUnavailable(
                f"the operator may not read Secret {namespace}/{name} (named by {field}), which a job on a Ray cluster "
                f"needs: install the chart with ray.readSecrets=true (or set ray.address)") from None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def secret_env(job: MedDistillJob, serving: bool) -> dict[str, str]:
    """What the job's Secrets give a stage (or the Serve app) on a Ray cluster; values never logged."""
    refs = raybackend.secret_refs(job, serving)
    secrets = {name: _read_secret(job.metadata.namespace, name, field) for field, name in refs.items()}
    return raybackend.secret_env(job, secrets, serving)


def apply_on_ray(ray: raybackend.RayCluster, job: MedDistillJob, uid: str, p: Plan) -> None:
    ns, name = job.metadata.namespace, job.metadata.name
    for item in p.create:
        if isinstance(item, StartStage):
            sid = raybackend.submission_id(ns, name, item.stage, item.attempt)
            if ray.submit(job, uid, item, secret_env(job, serving=False)):
                metrics.CHILDREN_CREATED.labels("rayjobs-api").inc()
                log.info("submitted Ray job %s to %s", sid, ray.address)
        else:
            ray.deploy(job, item, secret_env(job, serving=True))
            metrics.CHILDREN_CREATED.labels("serve-apps").inc()
            log.info("deployed Serve app %s on %s", raybackend.app_name(ns, name), ray.address)
    for item in p.update:
        ray.deploy(job, item, secret_env(job, serving=True))
        log.info("updated Serve app %s to model %s", raybackend.app_name(ns, name), item.model_uri)
    for item in p.delete:
        if item.kind == "stage":
            ray.stop_and_delete(item.name)
        else:
            ray.remove_apps({item.name})
        log.info("removed %s %s from %s", "Ray job" if item.kind == "stage" else "Serve app", item.name, ray.address)


def apply(job: MedDistillJob, uid: str, p: Plan) -> None:
    ray = ray_cluster(job)
    if ray is not None:
        return apply_on_ray(ray, job, uid, p)
    api, ns = _custom(), job.metadata.namespace
    for item in p.create:
        if isinstance(item, StartStage):
            body, plural, what = kuberay.rayjob(job, uid, item), kuberay.RAYJOBS, f"RayJob {ns}/{item.name}"
        else:
            body, plural, what = kuberay.rayservice(job, uid, item), kuberay.RAYSERVICES, f"RayService {ns}/{item.name}"
        try:
            api.create_namespaced_custom_object(kuberay.RAY_GROUP, kuberay.RAY_VERSION, ns, plural, body)
            metrics.CHILDREN_CREATED.labels(plural).inc()
            log.info("created %s", what)
        except ApiException as e:
            if e.status != 409:  # 409: it exists already (deterministic names) -- nothing to do
                _forbidden(e, "create", what)
                raise
    for item in p.update:
        api.patch_namespaced_custom_object(kuberay.RAY_GROUP, kuberay.RAY_VERSION, ns, kuberay.RAYSERVICES,
                                           item.name, kuberay.rayservice_model_patch(job, item))
        log.info("updated RayService %s/%s to model %s", ns, item.name, item.model_uri)
    for item in p.delete:
        plural = kuberay.RAYJOBS if item.kind == "stage" else kuberay.RAYSERVICES
        try:
            api.delete_namespaced_custom_object(kuberay.RAY_GROUP, kuberay.RAY_VERSION, ns, plural, item.name,
                                                propagation_policy="Background")
            log.info("deleted %s %s/%s", plural, ns, item.name)
        except ApiException as e:
            if e.status != 404:
                _forbidden(e, "delete", f"{plural} {ns}/{item.name}")
                raise


def write_status(body: dict, status: dict) -> bool:
    """Replace the status whole (PUT /status with resourceVersion: a stale write conflicts, not wins)."""
    MedDistillJobStatus.model_validate(status)  # nothing the CRD schema would prune or refuse
    if body.get("status") == status:
        return False
    new = {**body, "status": status}
    _custom().replace_namespaced_custom_object_status(API_GROUP, API_VERSION, body["metadata"]["namespace"], PLURAL,
                                                      body["metadata"]["name"], new)
    return True


def post_event(body: dict, type_: str, reason: str, message: str) -> None:
    meta = body["metadata"]
    now = datetime.now(timezone.utc)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(api_version=f"{API_GROUP}/{API_VERSION}", kind=KIND,
                                                 name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
        type=type_, reason=reason, message=message[:1024], first_timestamp=now, last_timestamp=now, count=1,
        source=client.V1EventSource(component="meddistill-operator"), reporting_component="meddistill-operator",
    )
    try:
        client.CoreV1Api().create_namespaced_event(meta["namespace"], event)
    except ApiException as e:  # an event is never worth failing a reconcile for
        _forbidden(e, "create", "events")
        log.warning("could not post event %s: %s", reason, e.reason)


# --------------------------------------------------------------------------------------------
# Reconcile
# --------------------------------------------------------------------------------------------


def reconcile(namespace: str, name: str) -> None:
    with _lock((namespace, name)):
        started = time.monotonic()
        try:
            _reconcile(namespace, name)
            metrics.RECONCILES.labels("ok").inc()
        except raybackend.RayBackendError as e:  # unreachable cluster, refused submit: retried next resync
            metrics.RECONCILES.labels("ray_error").inc()
            log.error("%s/%s: reconcile failed on the Ray cluster: %s", namespace, name, e)
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
        body = _custom().get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return  # deleted: the garbage collector removes its children
        raise
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return
    doc = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
    try:
        job = MedDistillJob.model_validate(doc)
    except ValidationError as e:
        _refuse(body, e)
        return
    try:
        job.status = MedDistillJobStatus.model_validate(body.get("status") or {})
    except ValidationError as e:
        # Not the user's fault: re-plan from the children alone (recorded stages are re-read
        # from their manifests) instead of failing the job.
        log.warning("%s/%s: ignoring an unreadable status: %s", namespace, name, e)
    observed = observe(job, meta["uid"])
    observed = replace(observed, lineage=served_lineage.check(job, observed))  # re-hashed before serving
    p = plan(job, observed, datetime.now(timezone.utc))
    try:
        apply(job, meta["uid"], p)
        _secret_warned.pop((namespace, name), None)
    except raybackend.SecretUnavailable as e:  # the user's to fix: say so where they look (kubectl describe)
        if _secret_warned.get((namespace, name)) != str(e):  # once per distinct problem, not every resync
            post_event(body, "Warning", "SecretUnavailable", str(e))
            _secret_warned[(namespace, name)] = str(e)
        raise
    ray = ray_cluster(job)
    if ray is not None and p.status.get("serving"):
        # The planner names the KubeRay Service; on a Ray cluster the app has its own route.
        p.status["serving"].update(endpoint=ray.endpoint(namespace, name), child=raybackend.app_name(namespace, name))
    if write_status(body, p.status):
        log.info("%s/%s: phase %s stage %s", namespace, name, p.status["phase"], p.status.get("currentStage") or "-")
    for ev in p.events:
        post_event(body, ev.type, ev.reason, ev.message)


def _refuse(body: dict, error: ValidationError) -> None:
    """A job the API server accepted but the typed spec refuses (should not happen: same schema)."""
    msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())[:1000]
    log.error("%s/%s: the spec is invalid, the job fails: %s", body["metadata"]["namespace"], body["metadata"]["name"], msg)
    prev = body.get("status") or {}
    if prev.get("phase") == "Failed":
        return
    now = rfc3339(datetime.now(timezone.utc))
    status = MedDistillJobStatus.model_validate({
        "phase": "Failed", "observedGeneration": body["metadata"].get("generation", 0),
        "conditions": [{"type": "Failed", "status": "True", "reason": "InvalidSpec", "message": msg, "lastTransitionTime": now}],
    }).model_dump(by_alias=True, exclude_none=True)
    write_status(body, status)
    post_event(body, "Warning", "InvalidSpec", msg)


# --------------------------------------------------------------------------------------------
# kopf wiring
# --------------------------------------------------------------------------------------------


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
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
    """Events that only echo what this operator just wrote; skipping them halves API traffic.

    A job MODIFIED event whose status already reflects its generation is our status write coming
    back (a spec change bumps the generation); a child ADDED without status is our create. The
    initial listing (type None, i.e. resume after a restart) is always reconciled, and the periodic
    resync backs up anything skipped here.
    """
    if type == "MODIFIED" and body.get("kind") == KIND:
        status = body.get("status") or {}
        return status.get("observedGeneration") == body.metadata.get("generation")
    return type == "ADDED" and body.get("kind") != KIND and not body.get("status")


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def on_job_event(type: str | None, body: kopf.Body, **_) -> None:
    # Covers create, update, resume (the initial listing) alike.
    if type == "DELETED":
        _collect_ray_garbage()  # no owner references on a Ray cluster; KubeRay children go by GC
        return
    if _echo_of_own_write(type, body):
        return
    reconcile(body.metadata.namespace, body.metadata.name)


@kopf.on.event(kuberay.RAY_GROUP, kuberay.RAY_VERSION, kuberay.RAYJOBS, labels={kuberay.LABEL_JOB: kopf.PRESENT})
def on_rayjob_event(type: str | None, body: kopf.Body, **_) -> None:
    if not _echo_of_own_write(type, body):
        reconcile(body.metadata.namespace, body.metadata.labels[kuberay.LABEL_JOB])


@kopf.on.event(kuberay.RAY_GROUP, kuberay.RAY_VERSION, kuberay.RAYSERVICES, labels={kuberay.LABEL_JOB: kopf.PRESENT})
def on_rayservice_event(type: str | None, body: kopf.Body, **_) -> None:
    if not _echo_of_own_write(type, body):
        reconcile(body.metadata.namespace, body.metadata.labels[kuberay.LABEL_JOB])


async def _resync_forever() -> None:
    """Backstop: re-plan every job periodically (artifacts may appear without any k8s event)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(Config.resync_seconds)
        try:
            jobs = await loop.run_in_executor(None, _list_jobs)
        except Exception as e:
            log.warning("resync: cannot list %s: %s", PLURAL, e)
            continue
        for ns, name in jobs:
            await loop.run_in_executor(None, reconcile, ns, name)
        await loop.run_in_executor(None, _collect_ray_garbage)


def _list_job_objects() -> list[dict]:
    api = _custom()
    if Config.namespace:
        return api.list_namespaced_custom_object(API_GROUP, API_VERSION, Config.namespace, PLURAL)["items"]
    return api.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)["items"]


def _list_jobs() -> list[tuple[str, str]]:
    return [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in _list_job_objects()]


def _collect_ray_garbage() -> None:
    """Stop Ray jobs and remove Serve apps of MedDistillJobs that are gone (level-triggered)."""
    if Config.ray_address:
        raybackend.cluster(Config.ray_address)  # known from the start, even before any job used it
    for ray in raybackend.known_clusters():
        try:
            snapshot = ray.snapshot()  # first: see RayCluster.collect_garbage for why
            live = {(o["metadata"]["namespace"], o["metadata"]["name"]): o["metadata"]["uid"] for o in _list_job_objects()}
            for what in ray.collect_garbage(snapshot, live, Config.namespace):
                log.info("removed %s from %s: its MedDistillJob is gone (or was stopped)", what, ray.address)
        except (raybackend.RayBackendError, ApiException, OSError, RuntimeError) as e:
            log.warning("garbage collection on %s failed, retrying next resync: %s", ray.address, e)
