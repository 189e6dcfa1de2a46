"""What the operator writes on a MedDistillJob itself: its status (whole, never merged) and Events,
including a blocked reconcile's condition and a refused spec's Failed phase."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from meddistill.spec.models import API_GROUP, API_VERSION, KIND, PLURAL, MedDistillJob, MedDistillJobStatus

from . import kube_api
from .failures import ReconcileBlocked, blocked_status
from .planner import job_generation, rfc3339

log = logging.getLogger("meddistill.operator")


def custom_api() -> client.CustomObjectsApi:
    return kube_api.custom_objects()


def write_status(body: dict, status: dict) -> bool:
    """Replace the status whole (PUT /status with resourceVersion: a stale write conflicts, not wins)."""
    MedDistillJobStatus.model_validate(status)  # nothing the CRD schema would prune or refuse
    if body.get("status") == status:
        return False
    new = {**body, "status": status}
    custom_api().replace_namespaced_custom_object_status(API_GROUP, API_VERSION, body["metadata"]["namespace"], PLURAL,
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
        kube_api.core().create_namespaced_event(meta["namespace"], event)
    except ApiException as e:  # an event is never worth failing a reconcile for
        if e.status == 403 and "NamespaceTerminating" not in str(e.body):
            log.error("403 Forbidden: cannot create events in %s: the operator's RBAC role lacks it (check the "
                      "chart's ClusterRole/Role): %s", meta["namespace"], e.body)
        log.warning("could not post event %s: %s", reason, e.reason)


def refuse(body: dict, error: ValidationError) -> None:
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


def write_blocked(body: dict, job: MedDistillJob, e: ReconcileBlocked) -> None:
    """The owner's to fix: say so where they look (conditions, kubectl describe), one event per distinct cause."""
    meta = body["metadata"]
    log.error("%s/%s: %s: %s", meta["namespace"], meta["name"], e.reason, e)
    status, new = blocked_status(body.get("status") or {}, e, job_generation(job), rfc3339(datetime.now(timezone.utc)))
    write_status(body, MedDistillJobStatus.model_validate(status).model_dump(by_alias=True, exclude_none=True))
    if new:
        post_event(body, "Warning", e.reason, str(e))
