"""The KubeRay backend: each stage attempt a RayJob, the serving app a RayService, in the job's namespace.

Children carry an owner reference to their MedDistillJob, so the garbage collector removes them
with it (no garbage collection here) and a re-created job with the same name never adopts the old
job's children. A create that finds its name taken (409) is checked the same way (RayJobs, RayServices,
the head NetworkPolicy): a child this job owns is a restart finding its own work;
anything else is a ChildConflict, never "Running".
API errors become ReconcileBlocked with the cause and the fix, so they reach the job's conditions
and events, not only the operator's log. Manifests are rendered in kuberay_objects.py.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from meddistill.spec.models import MedDistillJob

from .. import kube_api, metrics
from ..failures import CHILD_CONFLICT, CHILD_REFUSED, FORBIDDEN, KUBERAY_MISSING, QUEUE_MISSING, ReconcileBlocked
from ..planner import Observed, Plan, ServingTarget, StartStage
from .kuberay_objects import (
    KUEUE_QUEUE_LABEL,
    LABEL_JOB,
    RAY_GROUP,
    RAY_VERSION,
    RAYJOBS,
    RAYSERVICES,
    head_network_policy,
    rayjob,
    rayservice,
    rayservice_model_patch,
    serving_app,
    serving_target,
    stage_run,
)

log = logging.getLogger("meddistill.operator")
KIND_OF = {RAYJOBS: "RayJob", RAYSERVICES: "RayService"}
# Namespaces of the KubeRay operator (comma-separated; the chart sets it): the only outside pods the
# job's Ray heads admit on the dashboard port. Unset: a pod labelled as KubeRay's in any namespace.
KUBERAY_NAMESPACES_ENV = "MEDDISTILL_KUBERAY_NAMESPACES"
# A get that returns only metadata: all the owner check needs.
METADATA_ONLY = {"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"}
# Kueue's LocalQueue, newest API version first (v1beta1 is served by every Kueue release so far).
KUEUE_GROUP, KUEUE_VERSIONS, LOCALQUEUES = "kueue.x-k8s.io", ("v1beta2", "v1beta1"), "localqueues"
# Phases with a Ray cluster running or about to be: the guard runs on their every reconcile.
LIVE_PHASES = ("Running", "Serving")


def owned_by(obj: dict, uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])


def _api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


def blocked(e: ApiException, verb: str, what: str, plural: str) -> ReconcileBlocked | None:
    """What an API error on a child means for the job's owner; None when it is not theirs to fix."""
    if e.status == 403 and "NamespaceTerminating" not in str(e.body):
        return ReconcileBlocked(
            f"403 Forbidden: cannot {verb} {what}: {_api_message(e)}; the operator's RBAC role lacks a permission: "
            f"install the chart's ClusterRole/Role (with rbac.scope=namespace, list this namespace in watchNamespace)",
            FORBIDDEN)
    if e.status == 404 and verb in ("create", "list"):
        return ReconcileBlocked(
            f"the API server does not serve {plural}.{RAY_GROUP}/{RAY_VERSION} ({what}): install KubeRay v1.x "
            f"(its CRDs), or set spec.ray.address to run on an existing Ray cluster", KUBERAY_MISSING)
    if e.status in (400, 422):
        detail = _api_message(e)
        fix = (f"spec.queueName must be a valid label value ({KUEUE_QUEUE_LABEL})" if KUEUE_QUEUE_LABEL in detail
               else "fix the spec field it names (spec.scheduling, spec.queueName, spec.image)")
        return ReconcileBlocked(f"the API server refused {what} ({e.status}): {detail}; {fix}", CHILD_REFUSED)
    return None


def not_owned(what: str, obj: dict, delete: str) -> ReconcileBlocked:
    meta = obj.get("metadata") or {}
    owners = ", ".join(f"{o.get('kind')}/{o.get('name')}" for o in meta.get("ownerReferences") or []) or "none"
    return ReconcileBlocked(f"{what} exists and is not owned by this MedDistillJob (owners: {owners}): "
                            f"delete it ({delete}) or rename this job", CHILD_CONFLICT)


class KubeRayBackend:
    """backends.Backend for KubeRay; stateless (every call reads the API server)."""

    def _api(self) -> client.CustomObjectsApi:
        return kube_api.custom_objects()

    def _list(self, plural: str, job: MedDistillJob, uid: str) -> list[dict]:
        ns = job.metadata.namespace
        try:
            items = self._api().list_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, plural,
                                                              label_selector=f"{LABEL_JOB}={job.metadata.name}")["items"]
        except ApiException as e:
            raise blocked(e, "list", f"{plural} in {ns}", plural) or e from None
        return [o for o in items if owned_by(o, uid)]  # a re-created job must not adopt old children

    def observe(self, job: MedDistillJob, uid: str) -> Observed:
        runs = [run for obj in self._list(RAYJOBS, job, uid) if (run := stage_run(obj)) is not None]
        services = self._list(RAYSERVICES, job, uid)
        # Each pod has a filesystem of its own: the planner refuses a local artifacts.uri before any stage.
        return Observed(runs=tuple(runs), serving=serving_app(services[0]) if services else None, local_paths="per-pod")

    def endpoint(self, job: MedDistillJob) -> ServingTarget:
        return serving_target(job)

    def _create(self, ns: str, plural: str, body: dict, uid: str) -> None:
        name, what = body["metadata"]["name"], f"{KIND_OF[plural]} {ns}/{body['metadata']['name']}"
        api = self._api()
        try:
            api.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, plural, body)
            metrics.CHILDREN_CREATED.labels(plural).inc()
            log.info("created %s", what)
            return
        except ApiException as e:
            if e.status != 409:
                raise blocked(e, "create", what, plural) or e from None
        # A list by name, not a get: the chart grants list/watch, and a get would need one more verb.
        found = api.list_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, plural,
                                                  field_selector=f"metadata.name={name}")["items"]
        if found and not owned_by(found[0], uid):  # ours (or gone since): a restart found its own child; else not ours
            raise not_owned(what, found[0], f"kubectl delete {plural}.{RAY_GROUP} -n {ns} {name}")

    def _guard(self, job: MedDistillJob, uid: str) -> None:
        """The NetworkPolicy closing the job's Ray pods, before any Ray cluster that needs it (their
        token Secrets are KubeRay's: kuberay_objects.AUTH_SECRET_KEY). The policy holds nothing secret:
        on a 409 its metadata is read for the owner check, and a foreign one (not closing this job's
        pods) blocks the job."""
        ns, name = job.metadata.namespace, job.metadata.name
        kuberay_ns = tuple(n for n in os.environ.get(KUBERAY_NAMESPACES_ENV, "").split(",") if n)
        net = kube_api.networking()
        policy, plural = f"{name}-ray-head", "networkpolicies"
        what = f"NetworkPolicy {ns}/{policy}"
        try:
            net.create_namespaced_network_policy(ns, head_network_policy(job, uid, kuberay_ns))
            return
        except ApiException as e:
            if e.status != 409:
                raise blocked(e, "create", what, plural) or e from None
        try:
            found = json.loads(net.read_namespaced_network_policy(policy, ns, _headers=METADATA_ONLY,
                                                                  _preload_content=False).data)
        except ApiException as e:
            if e.status == 404:  # deleted since the 409: the next reconcile creates it
                return
            raise blocked(e, "get", what, plural) or e from None
        if not owned_by(found, uid):
            raise not_owned(what, found, f"kubectl delete {plural} -n {ns} {policy}")

    def _check_queue(self, job: MedDistillJob) -> None:
        """spec.queueName names a LocalQueue in the job's namespace. Kueue leaves a RayJob whose queue does not
        exist suspended for ever (and nothing un-suspends it without Kueue), so a job would sit Queued with
        no word why: it is held instead, nothing created, until the queue exists."""
        ns, queue = job.metadata.namespace, job.spec.queue_name
        api = self._api()
        for version in KUEUE_VERSIONS:
            try:
                found = api.list_namespaced_custom_object(KUEUE_GROUP, version, ns, LOCALQUEUES,
                                                          field_selector=f"metadata.name={queue}")["items"]
            except ApiException as e:
                if e.status == 404:  # this version (or Kueue itself) is not served
                    continue
                raise blocked(e, "list", f"LocalQueue {ns}/{queue}", LOCALQUEUES) or e from None
            if found:
                return
            raise ReconcileBlocked(
                f"spec.queueName {queue!r}: there is no Kueue LocalQueue {queue!r} in namespace {ns}, so Kueue would "
                f"never admit the job's stages; create it (kind: LocalQueue, spec.clusterQueue: ...) or ask the "
                f"platform team for the queue name to use, or remove spec.queueName", QUEUE_MISSING)
        raise ReconcileBlocked(
            f"spec.queueName {queue!r}: the API server does not serve Kueue's LocalQueues ({LOCALQUEUES}.{KUEUE_GROUP}), "
            f"so nothing would ever admit the job's stages: install Kueue, or remove spec.queueName", QUEUE_MISSING)

    def apply(self, job: MedDistillJob, uid: str, p: Plan) -> None:
        api, ns = self._api(), job.metadata.namespace
        if job.spec.queue_name and any(isinstance(item, StartStage) for item in p.create):
            self._check_queue(job)  # before anything is created for a queue that cannot admit it
        # Not only before a create: a policy deleted while a cluster runs comes back (an owned one costs
        # a create (409) and a metadata get).
        if p.create or p.status.get("phase") in LIVE_PHASES:
            self._guard(job, uid)
        for item in p.create:
            if isinstance(item, StartStage):
                self._create(ns, RAYJOBS, rayjob(job, uid, item), uid)
            else:
                self._create(ns, RAYSERVICES, rayservice(job, uid, item), uid)
        for item in p.update:
            try:
                api.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, RAYSERVICES, item.name,
                                                   rayservice_model_patch(job, item))
            except ApiException as e:
                raise blocked(e, "patch", f"RayService {ns}/{item.name}", RAYSERVICES) or e from None
            log.info("updated RayService %s/%s to model %s", ns, item.name, item.model_uri)
        for item in p.delete:
            plural = RAYJOBS if item.kind == "stage" else RAYSERVICES
            try:
                api.delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, plural, item.name,
                                                    propagation_policy="Background")
                log.info("deleted %s %s/%s", plural, ns, item.name)
            except ApiException as e:
                if e.status != 404:
                    raise blocked(e, "delete", f"{KIND_OF[plural]} {ns}/{item.name}", plural) or e from None

    def collect_garbage(self, list_live: Callable[[], dict[tuple[str, str], str]], namespace: str | None) -> list[str]:
        return []  # owner references: the garbage collector removes a deleted job's children
