"""Replacing a served model on a real Ray head (the Ray-cluster backend's Serve REST API): a client
sends requests in a loop while the planner points the job's Serve app at a new model, and no request
fails; once status reports the new model ready, every answer comes from it.

The same with `serving.replaces`: a second job takes the first one's endpoint over the same way, the
first stops reconciling it, and deleting the first leaves it serving.

Two tiny random models that answer differently stand in for the old and the new quantized student
(the serving engine loads any model directory). The planner decides from a status that records every
stage done, as the operator would after a re-run; the backend applies what it plans, as the
handlers do. Loopback only, bounded (MAX_REQUESTS, each with a timeout).
"""
from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone

import httpx
import pytest
import yaml

from meddistill.operator.backends import ray_clusters, raycluster
from meddistill.operator.backends.ray_clusters import AllowedCluster, AllowedClusters, TokenSecret
from meddistill.operator.planner import Serve, plan
from meddistill.operator.serving_gate import ServedLineage
from meddistill.spec.models import MedDistillJob, MedDistillJobStatus, pipeline_stages
from tests.e2e_fixture import RayHead
from tests.pipeline_fixture import write_tiny_model
from tests.support.kube_cluster import REPO_ROOT

pytestmark = pytest.mark.slow  # a Ray head, Serve and two model loads: a few minutes on 2 busy cores

MAX_REQUESTS = 500
PACE_SECONDS = 0.4  # between requests: the loop outlasts the new replica's start, bounded
# A client's patience: a stop-first update (Serve's default) leaves no replica for as long as the new
# one takes to load (19 s measured here for a tiny model; minutes for a 7B one), which this exceeds.
CLIENT_TIMEOUT_SECONDS = 10
PROMPT = [{"role": "user", "content": "Which organ produces insulin?"}]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # 3 logical CPUs: the old replica (1 CPU) keeps serving while the new one (1 CPU) starts.
    ray = RayHead(tmp_path_factory.mktemp("ray-head"), num_cpus=3).start()
    yield ray
    ray.stop()


def two_models(folder) -> tuple[str, str]:
    """Two tiny models with the same tokenizer and different weights (so their answers differ)."""
    import torch
    from transformers import AutoModelForCausalLM

    old = write_tiny_model(folder / "old")
    new = folder / "new"
    shutil.copytree(old, new)
    model = AutoModelForCausalLM.from_pretrained(new)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(new)
    return str(old), str(new)


def served_job(cluster: str, tmp_path, quantized: str, name: str = "rep", replaces: str | None = None) -> MedDistillJob:
    """The quickstart on the listed cluster, every stage recorded done with `quantized` as its model."""
    doc = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": "team-a"}
    doc["spec"]["ray"] = {"cluster": cluster}
    doc["spec"]["artifacts"] = {"uri": str(tmp_path / "runs")}
    doc["spec"]["quantization"] = {"method": "none"}
    doc["spec"]["serving"] = {"enabled": True, "engine": "transformers", "minReplicas": 1, "maxReplicas": 1,
                              "maxModelLen": 256, **({"replaces": replaces} if replaces else {})}
    job = MedDistillJob.model_validate(doc)
    stages = [{"name": s, "state": "Succeeded", "attempt": 1, "artifactDigest": "d" * 64,
               "artifactUri": quantized if s == "quantize" else f"{tmp_path}/{s}"} for s in pipeline_stages(job.spec)]
    job.status = MedDistillJobStatus.model_validate({"stages": stages})
    return job


class Client(threading.Thread):
    """Sends chat requests one after another until stopped (or MAX_REQUESTS); records every outcome."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.log, self.slowest = f"{url}/chat/completions", threading.Event(), [], 0.0

    def run(self):
        body = {"model": "meddistill-student", "messages": PROMPT, "max_tokens": 6, "temperature": 0}
        with httpx.Client(timeout=CLIENT_TIMEOUT_SECONDS) as http:
            while not self.stop.is_set() and len(self.log) < MAX_REQUESTS:
                sent = time.monotonic()
                try:
                    r = http.post(self.url, json=body)
                    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text[:300]
                    self.log.append((sent, r.status_code, text))
                    self.slowest = max(self.slowest, time.monotonic() - sent)
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    self.log.append((sent, type(e).__name__, str(e)[:300]))
                self.stop.wait(PACE_SECONDS)


@pytest.fixture
def backend(head, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    allowed = AllowedCluster(name="local-head", address=head.address, allow_insecure=True,
                             token_secret=TokenSecret(name="unused", namespace="unused"))
    monkeypatch.setattr(ray_clusters, "ALLOWED", AllowedClusters(clusters=[allowed]))
    monkeypatch.setitem(raycluster._clusters, allowed, raycluster.RayCluster(allowed, token=head.token))
    backend = raycluster.RayClusterBackend(raycluster.cluster(allowed))
    yield backend
    backend.collect_garbage(dict, None)  # no live jobs: nothing of this test keeps serving


def reconcile(backend, job: MedDistillJob):
    """One turn of the handlers: observe -> plan -> apply; returns the plan."""
    observed = replace(backend.observe(job, f"uid-{job.metadata.name}"), target=backend.endpoint(job),
                       lineage=ServedLineage(verified=True, note="test"))
    p = plan(job, observed, datetime.now(timezone.utc))
    backend.apply(job, f"uid-{job.metadata.name}", p)
    return p


def serving_when_ready(backend, job: MedDistillJob, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = reconcile(backend, job)
        if p.status["phase"] == "Serving":
            return p.status["serving"]
        time.sleep(1)
    raise AssertionError(f"not Serving after {timeout}s: {p.status}")


def switch_reported(backend, job: MedDistillJob, model: str, also=lambda: None, timeout: float = 300) -> float:
    """Reconcile until status says Serving on `model` (what a user reads); returns when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1)
        p, _ = reconcile(backend, job), also()
        app = backend.observe(job, f"uid-{job.metadata.name}").serving
        if p.status["phase"] == "Serving" and app.model_uri == model:
            return time.monotonic()
    raise AssertionError(f"the new model was not reported ready: {p.status}")


def started_client(endpoint: str) -> Client:
    client = Client(endpoint)
    client.start()
    while len(client.log) < 5 and client.is_alive():
        time.sleep(0.2)
    return client


def check_answers(client: Client, switched: float) -> None:
    time.sleep(5)  # some answers after the switch
    client.stop.set()
    client.join(CLIENT_TIMEOUT_SECONDS + 5)
    log = client.log
    print(f"{len(log)} requests, {sum(1 for e in log if e[0] > switched)} after the switch, slowest {client.slowest:.1f}s")
    failed = [entry for entry in log if entry[1] != 200]
    assert not failed, f"{len(failed)} of {len(log)} requests failed during the switch: {failed[:5]}"
    old_answer = log[0][2]
    after = [text for sent, _, text in log if sent > switched]
    assert after, "no request was sent after the switch"
    assert old_answer not in after, f"the old model answered after the switch was reported: {after}"
    assert len(set(after)) == 1  # one model, greedy: one answer


def test_a_served_model_is_replaced_without_a_failed_request(backend, tmp_path):
    old_model, new_model = two_models(tmp_path)
    job = served_job("local-head", tmp_path, old_model)
    assert isinstance(reconcile(backend, job).create[0], Serve)
    client = started_client(serving_when_ready(backend, job)["endpoint"])

    # The re-run's new model (evaluated, gate and lineage passed): the same app, updated in place.
    job = served_job("local-head", tmp_path, new_model)
    p = reconcile(backend, job)
    assert p.update == [Serve("mdj_team-a_rep", new_model)] and not p.delete and not p.create
    check_answers(client, switch_reported(backend, job, new_model))


def test_serving_replaces_takes_the_other_jobs_endpoint_over_without_a_failed_request(backend, tmp_path):
    old_model, new_model = two_models(tmp_path)
    old = served_job("local-head", tmp_path, old_model, name="old")
    endpoint = serving_when_ready(backend, old)["endpoint"]
    client = started_client(endpoint)

    new = served_job("local-head", tmp_path, new_model, name="new", replaces="old")
    p = reconcile(backend, new)
    assert p.update == [Serve("mdj_team-a_old", new_model)] and not p.create and not p.delete
    old_plans = []
    switched = switch_reported(backend, new, new_model, also=lambda: old_plans.append(reconcile(backend, old)))
    assert reconcile(backend, new).status["serving"]["endpoint"] == endpoint  # the same endpoint, now the new job's
    p = reconcile(backend, old)  # the old job sees it was replaced and leaves the app alone
    assert not p.update and not p.delete and p.status["phase"] == "Succeeded"
    replaced = next(c for c in p.status["conditions"] if c["type"] == "Replaced")
    assert replaced["status"] == "True" and "team-a/new" in replaced["message"]
    assert not any(q.update or q.delete for q in old_plans)  # no fight over the model during the switch

    # The old job is deleted: garbage collection keeps the app, which its new owner serves.
    assert backend.collect_garbage(lambda: {("team-a", "new"): "uid-new"}, None) == []
    check_answers(client, switched)
    assert backend.observe(new, "uid-new").serving.owner == "team-a/new"
