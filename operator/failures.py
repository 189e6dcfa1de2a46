"""What failures say in status and events: a failed stage run's error class and short message (never
log text), and a blocked reconcile's condition (ReconcileBlocked: cause and fix, not only a log line).

A stage's log and its exception message can quote a training record (patient text), and status
and events are readable by anyone who can `kubectl get` the job. So only names that code chose
travel there: the stage, the exception class from the stage's `error:` line, and the first clause
of Ray's/KubeRay's own message; the full log stays where access to it is already controlled.
"""

from __future__ import annotations

import re

# jobs/__main__.py prints `error: stage STAGE: ExceptionClass: message`; only the class is kept.
_ERROR_LINE = re.compile(r"^error: stage ([\w-]+): ([A-Za-z_][\w.]*)", re.M)
HEAD_CHARS = 160  # a Ray/KubeRay message's first clause is fixed text; longer means it quotes something


def redacted_failure(ray_message: str, logs: str, full_log: str) -> str:
    """`stage S raised Cls | <first clause of Ray's message> | full log: <where>`."""
    errors = _ERROR_LINE.findall(f"{logs or ''}\n{ray_message or ''}")
    parts = [f"stage {errors[-1][0]} raised {errors[-1][1]}"] if errors else []
    # "Job entrypoint command failed with exit code 1, last available logs (...):\n<logs>" -> its first clause
    head = (ray_message or "").strip().splitlines()[:1]
    head = [h.split(", last available logs")[0].split(": ")[0] for h in head]
    parts += [h if len(h) <= HEAD_CHARS else h[:HEAD_CHARS] + "..." for h in head if h]
    return " | ".join((parts or ["failed without a message"]) + [f"full log: {full_log}"])


# --------------------------------------------------------------------------------------------
# A reconcile that cannot proceed: a condition and a Warning event, not only the operator's log
# --------------------------------------------------------------------------------------------

ARTIFACT_STORE_UNAVAILABLE = "ArtifactStoreUnavailable"  # a manifest cannot be read (403, outage): never "missing"
CHILD_CONFLICT = "ChildConflict"  # a child's name is taken by an object this job does not own
CHILD_REFUSED = "ChildRefused"  # the API server refused a child (422)
FORBIDDEN = "Forbidden"  # the operator's RBAC lacks a permission (403)
KUBERAY_MISSING = "KubeRayMissing"  # the API server does not serve RayJobs/RayServices (404)
QUEUE_MISSING = "LocalQueueMissing"  # spec.queueName names no Kueue LocalQueue (or Kueue is not installed)
RAY_CLUSTER_UNAVAILABLE = "RayClusterUnavailable"  # unreachable, or it refused a submission
SECRET_UNAVAILABLE = "SecretUnavailable"
BLOCKED_REASONS = frozenset({ARTIFACT_STORE_UNAVAILABLE, CHILD_CONFLICT, CHILD_REFUSED, FORBIDDEN, KUBERAY_MISSING,
                             QUEUE_MISSING, RAY_CLUSTER_UNAVAILABLE, SECRET_UNAVAILABLE})


class ReconcileBlocked(RuntimeError):
    """The job cannot progress until someone fixes something: `reason` becomes a condition type,
    the message names the cause and the fix (it is shown to the job's owner, never log text)."""

    reason = RAY_CLUSTER_UNAVAILABLE

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        assert self.reason in BLOCKED_REASONS, self.reason


DEGRADED = "Degraded"


def blocked_status(prev: dict, blocked: ReconcileBlocked, generation: int, now: str) -> tuple[dict, bool]:
    """The last written status plus the blocking condition; (status, whether the condition is new).

    Nothing the plan intended happened, so the plan's status would claim children that do not
    exist: the previous status stays, a job that was Running shows Pending (it does not progress),
    and the next reconcile that gets through plans afresh (dropping the condition).
    """
    message = str(blocked)[:1024]
    old = {c.get("type"): c for c in prev.get("conditions") or []}
    same = old.get(blocked.reason)
    new = not (same and same.get("status") == "True" and same.get("message") == message)
    ltt = same["lastTransitionTime"] if same and same.get("status") == "True" else now
    was = old.get(DEGRADED)
    degraded_since = was["lastTransitionTime"] if was and was.get("status") == "True" else now  # whatever the cause
    conditions = [c for t, c in old.items() if t not in BLOCKED_REASONS | {"Progressing", DEGRADED}]
    conditions += [{"type": blocked.reason, "status": "True", "reason": blocked.reason, "message": message,
                    "lastTransitionTime": ltt, "observedGeneration": generation},
                   # the same, under a type that is always there (the cause's own type goes when it is fixed)
                   {"type": DEGRADED, "status": "True", "reason": blocked.reason, "message": message,
                    "lastTransitionTime": degraded_since, "observedGeneration": generation},
                   {"type": "Progressing", "status": "False", "reason": blocked.reason, "message": message,
                    "lastTransitionTime": ltt, "observedGeneration": generation}]
    phase = prev.get("phase") or "Pending"
    status = {**prev, "phase": "Pending" if phase == "Running" else phase, "conditions": conditions,
              "observedGeneration": generation}
    return status, new
