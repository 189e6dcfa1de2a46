"""High availability: replicas elect one active operator through kopf's peering.

kopf pauses a replica's watches while a live peer with a higher priority is in the peering object
(each replica picks its own priority: equal ones would all pause). The periodic resync and garbage
collection are this operator's own asyncio task, not a kopf watch, so they ask `is_active()` first:
a standby never writes. When the active replica dies, its entry expires after its lifetime and the
standby with the next priority resumes, re-listing every job (kopf's initial listing).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from kubernetes.client.exceptions import ApiException

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"


def _alive(entry: dict, now: datetime) -> bool:
    try:
        seen = datetime.fromisoformat(str(entry["lastseen"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return True  # kopf counts a peer that gives no time as just seen
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=timezone.utc)
    return seen + timedelta(seconds=int(entry.get("lifetime", 60))) > now


def outranked(status: dict, priority: int, now: datetime) -> bool:
    """Whether a live peer in the peering object's status has a higher priority than ours."""
    return any(int(e.get("priority", 0)) > priority and _alive(e, now) for e in (status or {}).values() if isinstance(e, dict))


def is_active(api, name: str, namespace: str | None, priority: int) -> bool:
    """True unless peering is on (`name`) and another live replica outranks this one."""
    if not name:
        return True
    try:
        if namespace:
            obj = api.get_namespaced_custom_object(PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings", name)
        else:
            obj = api.get_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", name)
    except ApiException as e:
        if e.status == 404:
            return False  # mandatory peering without its object: kopf does not run the watches either
        raise
    return not outranked(obj.get("status") or {}, priority, datetime.now(timezone.utc))
