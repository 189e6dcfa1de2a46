"""A retry's backoff ends between resyncs: the handlers reconcile the job then, once (no kopf, no API)."""
from __future__ import annotations

import time

from meddistill.operator import handlers


def test_the_job_is_reconciled_when_its_backoff_ends_once_however_often_it_was_planned(monkeypatch):
    calls = []
    monkeypatch.setattr(handlers, "reconcile", lambda ns, name: calls.append((ns, name, time.monotonic())))
    start = time.monotonic()
    for _ in range(3):  # every reconcile during the backoff plans the same retry
        handlers._requeue("team-a", "qs", 0.2)
    handlers._requeue("team-b", "qs", 0.2)
    time.sleep(1.5)
    assert sorted(c[:2] for c in calls) == [("team-a", "qs"), ("team-b", "qs")]
    assert all(c[2] - start >= 0.2 for c in calls)
