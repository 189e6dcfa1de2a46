"""When a failed stage run gets its next attempt: exponential backoff from the time it failed.

Pure and torch-free, for the planner. A stage that fails at once (a bad image, an unreachable store)
would otherwise burn every retry of `runPolicy.backoffLimit` within a few reconciles; waiting
10 s, 20 s, 40 s ... (capped at 10 min) gives a transient cause time to pass, as Kubernetes Jobs do.
"""

from __future__ import annotations

from datetime import datetime, timedelta

RETRY_BASE_SECONDS = 10.0
RETRY_MAX_SECONDS = 600.0


def retry_delay_seconds(failed_attempt: int) -> float:
    """How long after attempt n failed attempt n+1 starts: 10 s * 2^(n-1), at most 10 min."""
    return min(RETRY_BASE_SECONDS * 2 ** max(failed_attempt - 1, 0), RETRY_MAX_SECONDS)


def failure_time(run_end: datetime | None, recorded_end: datetime | None, now: datetime,
                 grace_seconds: float = 0.0) -> datetime:
    """When a run failed: its own end time (+ any grace it was given), else the time the operator
    first saw the failure and recorded in status, else now (the first sight)."""
    if run_end is not None:
        return run_end + timedelta(seconds=grace_seconds)
    return recorded_end or now


def retry_at(failed_attempt: int, failed_at: datetime) -> datetime:
    return failed_at + timedelta(seconds=retry_delay_seconds(failed_attempt))
