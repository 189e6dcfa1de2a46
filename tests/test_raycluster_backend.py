"""The Ray-cluster backend through the same protocol the reconcile calls, against a real Ray head
(Jobs API and Serve REST API with token auth; tests/e2e_fixture.py's RayHead), without the
20-minute quickstart: a stage is submitted, observed, re-submitted idempotently, refused when
another job holds its submission id, and collected once its job is gone. The stage itself is
stopped before it does real work.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest
import yaml

from meddistill.operator import backends
from meddistill.operator.backends import ray_clusters, raycluster
from meddistill.operator.backends.ray_clusters import AllowedCluster, AllowedClusters, TokenSecret
from meddistill.operator.backends.raycluster import RayClusterBackend
from meddistill.operator.failures import ReconcileBlocked
from meddistill.operator.planner import StartStage, plan
from meddistill.spec.models import MedDistillJob
from tests.e2e_fixture import RayHead
from tests.support.kube_cluster import REPO_ROOT

pytestmark = pytest.mark.slow  # a Ray head and Serve start: ~1 min on 2 busy cores


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ray = RayHead(tmp_path_factory.mktemp("ray-head"), num_cpus=1).start()
    yield ray
    ray.stop()


def ray_job(cluster: str, tmp_path) -> MedDistillJob:
    doc = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": "qs", "namespace": "team-a"}
    doc["spec"]["ray"] = {"cluster": cluster}
    doc["spec"]["artifacts"] = {"uri": str(tmp_path / "runs")}
    return MedDistillJob.model_validate(doc)


def test_submit_observe_conflict_and_garbage_collection_on_a_real_ray_head(head, tmp_path, monkeypatch):
    # The head's token reaches it as this cluster's own header, not from the operator's environment
    # (the token Secret is read through the API server in tests/test_ray_cluster_consent.py).
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    allowed = AllowedCluster(name="local-head", address=head.address, allow_insecure=True,
                             token_secret=TokenSecret(name="unused", namespace="unused"))
    monkeypatch.setattr(ray_clusters, "ALLOWED", AllowedClusters(clusters=[allowed]))
    monkeypatch.setitem(raycluster._clusters, allowed, raycluster.RayCluster(allowed, token=head.token))
    job = ray_job("local-head", tmp_path)
    backend = backends.for_job(job)
    assert isinstance(backend, RayClusterBackend)

    observed = backend.observe(job, "uid-1")
    assert observed.runs == () and observed.serving is None
    target = backend.endpoint(job)  # the Serve app's name and route on this cluster, not a KubeRay Service
    assert (target.name, target.endpoint) == ("mdj_team-a_qs", f"http://127.0.0.1:{head.serve_port}/team-a/qs/v1")
    # The README's ./runs resolves in each process's own directory: refused before any stage, saying the fix.
    relative = MedDistillJob.model_validate({**job.model_dump(by_alias=True, exclude_none=True),
                                             "spec": {**job.spec.model_dump(by_alias=True, exclude_none=True),
                                                      "artifacts": {"uri": "./runs"}}})
    refused = plan(relative, replace(observed, target=target), datetime.now(timezone.utc))
    failed = next(c for c in refused.status["conditions"] if c["type"] == "Failed")
    assert refused.create == [] and refused.status["phase"] == "Failed"
    assert failed["reason"] == "ArtifactStoreNotShared" and "relative path" in failed["message"]
    p = plan(job, replace(observed, target=target), datetime.now(timezone.utc))  # an absolute path: it runs
    assert p.create == [StartStage("teacher", 1, "qs-teacher-a1")]
    try:
        backend.apply(job, "uid-1", p)
        backend.apply(job, "uid-1", p)  # a restarted operator finds its own submission: nothing new
        runs = backend.observe(job, "uid-1").runs
        assert [(r.stage, r.attempt, r.name) for r in runs] == [("teacher", 1, "team-a_qs_teacher_a1")]
        assert runs[0].state in ("Pending", "Running", "Failed")

        # The job is deleted and re-created under the same name: the old submission is not the new job's.
        assert backend.observe(job, "uid-2").runs == ()
        with pytest.raises(ReconcileBlocked, match="team-a_qs_teacher_a1.*another MedDistillJob.*ray job stop") as e:
            backend.apply(job, "uid-2", p)
        assert e.value.reason == "ChildConflict"

        removed = backend.collect_garbage(lambda: {("team-a", "qs"): "uid-2"}, None)
        assert removed == [f"team-a_qs_teacher_a1 from {head.address}"]
        assert backend.observe(job, "uid-1").runs == ()
    finally:
        backend.collect_garbage(dict, None)  # no live jobs: nothing of this test keeps running
    assert backend.ray.jobs() == []
