"""operator/garbage.py against the real API server, as the operator's ServiceAccount: every backend
is asked to collect with the live jobs of the watched namespace (or all), listed when it asks, and
one backend's failure is logged, never raised into the handler that triggered it."""
from __future__ import annotations

import pytest

from meddistill.operator import backends, garbage
from meddistill.operator.failures import ReconcileBlocked
from tests.support.operator_inprocess import as_operator, fresh_namespace  # noqa: F401 - fixture
from tests.test_operator_kube import pvc_store, quickstart

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


class RecordingBackend:
    """A Ray cluster stand-in (a real head takes a minute to start): records what it is told is live."""

    def __init__(self, fails: bool = False):
        self.fails, self.seen = fails, []

    def collect_garbage(self, list_live, namespace):
        self.seen.append((namespace, list_live()))
        if self.fails:
            raise ReconcileBlocked("the Ray cluster is unreachable")
        return ["job x"]


def test_each_backend_collects_with_the_live_jobs_of_the_watched_namespace(kube_cluster, as_operator, monkeypatch):
    broken, working = RecordingBackend(fails=True), RecordingBackend()
    monkeypatch.setattr(backends, "every_backend", lambda address: [broken, working])
    with fresh_namespace(kube_cluster, "gc") as a, fresh_namespace(kube_cluster, "gc") as b:
        a.apply(quickstart("one", pvc_store(a.ns)))
        b.apply(quickstart("two", pvc_store(b.ns)))
        uid = a.job("one")["metadata"]["uid"]
        garbage.collect_garbage("", a.ns)
        assert working.seen == broken.seen == [(a.ns, {(a.ns, "one"): uid})]  # the failure did not stop the next
        everywhere = garbage.list_jobs(None)
        assert {(a.ns, "one"), (b.ns, "two")} <= set(everywhere)
