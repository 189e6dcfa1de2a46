"""The product's main use, for real: `helm install` the chart and `kubectl apply` a job on a one-node
Kubernetes cluster where the kubelet runs the pods (tests/support/node_cluster.py).

Nothing here plays KubeRay or writes a controller's status: the operator runs as a pod from the
image built from this checkout (tools/image/build.sh, the Dockerfile's steps), KubeRay's real
controller turns each stage's RayJob into head, worker and submitter pods, and the quickstart (made
small enough for 2 CPUs: tests/fixtures/cluster/quickstart-on-a-node.yaml) runs stage by stage in a
namespace that enforces PodSecurity "restricted", its artifacts on a claim. While it runs, what
happens on real clusters is done to it: a worker pod is deleted while the distill stage trains (Ray
Train restarts its worker group on the pod KubeRay re-creates, or the operator retries the stage),
and the job is suspended while the quantize stage runs (its pods go) and resumed (the stage runs
again and the job finishes). The served student is asked through its Service with the endpoint's
token.

Marked `cluster`: needs root and containerd (apt); `pytest -m "not cluster"` leaves it out.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.kube_cluster import REPO_ROOT
from tests.support.node_cluster import cache_dir

# The first test pays for the node cluster (a cold image build: minutes) and the whole pipeline.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(75 * 60)]

NS, RELEASE_NS, JOB = "ward", "meddistill-system", "quickstart"
JOB_FILE = REPO_ROOT / "tests" / "fixtures" / "cluster" / "quickstart-on-a-node.yaml"
CHART = REPO_ROOT / "charts" / "meddistill-operator"
PIPELINE_TIMEOUT_S = 45 * 60  # alone ~20 min; CI runs it beside the rest of the suite
GONE_WITHIN_S = 60


@dataclass
class Timeline:
    """What the watcher saw, every few seconds, while the job ran."""

    rayjobs: dict[str, dict] = field(default_factory=dict)  # name -> last status
    succeeded_at: dict[str, float] = field(default_factory=dict)  # RayJob -> when it first read SUCCEEDED
    pods_seen: dict[str, dict] = field(default_factory=dict)  # pod name -> {cluster, first, last}
    pods_during_distill: str = ""
    stage_log: str = ""
    phases: list[str] = field(default_factory=list)


@dataclass
class Disruptions:
    """What the test did to the running job, and what it saw right after."""

    killed_pod: str = ""
    killed_at: float = 0.0
    killed_at_step: int = 0  # the distill stage's last reported step when its worker pod was deleted
    kill_missed: str = ""  # why no worker was deleted mid-training (the test then fails)
    distill_steps: list[int] = field(default_factory=list)  # every step distill reported, in order, across restarts
    suspended_at: float = 0.0
    suspended_stage_pods: list[str] = field(default_factory=list)  # the quantize stage's pods when suspended
    pods_gone_after_s: float | None = None  # suspension -> none of those pods left
    phase_while_suspended: str = ""
    resumed_at: float = 0.0


def _objects(cluster, kind: str, ns: str = NS) -> list[dict]:
    out = cluster.kubectl("get", kind, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout).get("items", []) if out.returncode == 0 else []


def _job(cluster) -> dict:
    return json.loads(cluster.kubectl("get", "meddistilljob", JOB, "-n", NS, "-o", "json").stdout)


def _install(cluster) -> None:
    """What a platform team does: claims for artifacts (the job's, and the operator's view of the same
    storage), the endpoint's token, a restricted namespace, then the chart with the local image."""
    # The model and a dataset on a claim of their own (what the job's pvc://models/... names).
    models = cluster.add_pv("ward-models")
    from meddistill.modelsource import builtin_gguf_path

    for src, dest in ((builtin_gguf_path("smollm2-135m-instruct"), models / "smollm2"),
                      (REPO_ROOT / "meddistill/samples/medquad_qa/medquad.train600.jsonl", models / "data")):
        dest.mkdir(exist_ok=True)
        shutil.copy(src, dest / Path(src).name)
    folder = cluster.add_pv("ward-artifacts")
    cluster.artifacts_dir = folder
    cluster.add_pv("operator-artifacts", path=folder)  # the same storage, seen from the release namespace
    for ns in (NS, RELEASE_NS):
        cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted")
    claims = [("artifacts", NS, "ward-artifacts"), ("ward-artifacts", RELEASE_NS, "operator-artifacts"),
              ("models", NS, "ward-models")]
    for name, ns, pv in claims:
        cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": ns},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "local", "volumeName": pv,
                     "resources": {"requests": {"storage": "20Gi"}}}}))
    cluster.token = secrets.token_urlsafe(24)
    cluster.kubectl("create", "secret", "generic", "quickstart-endpoint", "-n", NS, f"--from-literal=token={cluster.token}")
    repo, tag = cluster.image.rsplit(":", 1)
    cluster.helm("install", "meddistill", str(CHART), "-n", RELEASE_NS, "--wait", "--timeout", "5m",
                 "--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
                 "--set", f"artifactClaims[0].namespace={NS}", "--set", "artifactClaims[0].claim=artifacts",
                 "--set", "artifactClaims[0].operatorClaim=ward-artifacts", timeout=400)


def _watch(cluster, timeline: Timeline, stop: threading.Event) -> None:
    while not stop.is_set():
        now = time.monotonic()
        for rj in _objects(cluster, "rayjobs.ray.io"):
            name, status = rj["metadata"]["name"], rj.get("status") or {}
            timeline.rayjobs[name] = status
            if status.get("jobStatus") == "SUCCEEDED":
                timeline.succeeded_at.setdefault(name, now)
            if "-distill-a" in name and status.get("jobDeploymentStatus") == "Running" and not timeline.pods_during_distill:
                timeline.pods_during_distill = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        for pod in _objects(cluster, "pods"):
            name = pod["metadata"]["name"]
            seen = timeline.pods_seen.setdefault(name, {"cluster": pod["metadata"].get("labels", {}).get("ray.io/cluster", ""),
                                                        "first": now, "containers": [c["name"] for c in pod["spec"]["containers"]]})
            seen["last"] = now
        if not timeline.stage_log:
            log = cluster.kubectl("logs", "-n", NS, f"job/{JOB}-teacher-a1", "--tail=400", check=False)
            if "Dataset" in log.stdout or "step" in log.stdout:
                timeline.stage_log = log.stdout
        try:
            phase = _job(cluster).get("status", {}).get("phase", "")
        except Exception:  # noqa: BLE001 - keep watching through a slow API server
            phase = ""
        if phase and (not timeline.phases or timeline.phases[-1] != phase):
            timeline.phases.append(phase)
        stop.wait(3)


def _distill_progress(cluster) -> list[dict]:
    """What the distill stage's rank 0 reported so far: its progress.jsonl on the claim's folder (a
    restarted or retried run appends from its resume step; the file goes when the stage's manifest
    is written)."""
    lines = []
    for path in cluster.artifacts_dir.glob("**/distill/progress.jsonl"):
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass  # a line being written
    return lines


def _kill_a_worker_mid_distill(cluster, d: Disruptions, stop: threading.Event) -> None:
    """Delete the distill stage's Ray worker pod once its training has reported a step and before the
    last one; then keep what the stage reports until its progress file goes."""
    worker = ""
    while not stop.is_set() and not d.killed_pod:
        if not worker:
            worker = next((p["metadata"]["name"] for p in _objects(cluster, "pods")
                           if "-distill-a" in p["metadata"]["name"] and "-worker-" in p["metadata"]["name"]
                           and p["status"].get("phase") == "Running"), "")
        progress = _distill_progress(cluster)
        if progress and worker:
            last, total = progress[-1]["step"], progress[0]["total"]
            if last >= total:
                d.kill_missed = f"training finished (step {last} of {total}) before the worker could be deleted"
                return
            d.killed_at_step, d.killed_at, d.killed_pod = last, time.monotonic(), worker
            # At once, as a node that dies or an OOM-kill takes it: a graceful delete gives the pod 30 s,
            # which this short stage outlives (its training finished while the pod was terminating).
            cluster.kubectl("delete", "pod", worker, "-n", NS, "--grace-period=0", "--force", "--wait=false")
            break
        stop.wait(0.5)
    # The file grows while one run trains; a retried attempt starts it anew: keep every step seen, in order.
    # A line is (step, time): a new attempt's step 1 is not the old one's.
    file_lines: list[tuple] = []
    while not stop.is_set():
        lines = [(p["step"], p.get("time")) for p in _distill_progress(cluster)]
        if lines and lines != file_lines:
            new = lines[len(file_lines):] if lines[:len(file_lines)] == file_lines else lines
            d.distill_steps += [step for step, _ in new]
            file_lines = lines
        stop.wait(0.5)


def _set_suspend(cluster, suspend: bool) -> float:
    cluster.kubectl("patch", "meddistilljob", JOB, "-n", NS, "--type=merge", "-p", json.dumps({"spec": {"suspend": suspend}}))
    return time.monotonic()


def _suspend_during_quantize(cluster, d: Disruptions) -> None:
    """Suspend the job once the quantize stage's submitter runs; resume when its pods are gone."""
    if d.resumed_at:
        return
    if not d.suspended_at:
        rayjob = next((rj for rj in _objects(cluster, "rayjobs.ray.io") if "-quantize-a" in rj["metadata"]["name"]
                       and (rj.get("status") or {}).get("jobDeploymentStatus") == "Running"), None)
        if rayjob is None:
            return
        d.suspended_stage_pods = [p["metadata"]["name"] for p in _objects(cluster, "pods")
                                  if p["metadata"]["name"].startswith(rayjob["metadata"]["name"])]
        d.suspended_at = _set_suspend(cluster, True)
        return
    left = [p["metadata"]["name"] for p in _objects(cluster, "pods") if p["metadata"]["name"] in d.suspended_stage_pods]
    phase = _job(cluster).get("status", {}).get("phase", "")
    if phase == "Suspended":
        d.phase_while_suspended = phase
    if not left and d.pods_gone_after_s is None:
        d.pods_gone_after_s = time.monotonic() - d.suspended_at
    # Resume once both were seen, or after 3 minutes (the test then fails on them; the job still finishes).
    if (d.pods_gone_after_s is not None and d.phase_while_suspended) or time.monotonic() - d.suspended_at > 180:
        d.resumed_at = _set_suspend(cluster, False)


@dataclass
class QuickstartOnNode:
    cluster: object
    timeline: Timeline
    disruptions: Disruptions
    status: dict
    wall_s: float


def _say(request, text: str) -> None:
    """What the run did, for people: to the terminal past pytest's capture, and appended to
    ~/.cache/meddistill/evidence/cluster-quickstart.log (an xdist worker's terminal is not shown)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        sys.stderr.write(text)
    log = cache_dir() / "evidence" / "cluster-quickstart.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text.lstrip("\n") + "\n")


@pytest.fixture(scope="module")
def quickstart_on_node(request, node_cluster) -> QuickstartOnNode:
    cluster = node_cluster
    _install(cluster)
    cluster.kubectl("apply", "-f", str(JOB_FILE))
    timeline, disruptions, stop = Timeline(), Disruptions(), threading.Event()
    watcher = threading.Thread(target=_watch, args=(cluster, timeline, stop), daemon=True)
    watcher.start()
    killer = threading.Thread(target=_kill_a_worker_mid_distill, args=(cluster, disruptions, stop), daemon=True)
    killer.start()
    started = time.monotonic()
    status: dict = {}
    try:
        while time.monotonic() - started < PIPELINE_TIMEOUT_S:
            status = _job(cluster).get("status", {})
            if status.get("phase") in ("Serving", "Succeeded", "Failed"):
                break
            _suspend_during_quantize(cluster, disruptions)
            time.sleep(3)
        # A finished stage's pods must go: keep watching until the last stage's are gone (or the limit passed).
        deadline = time.monotonic() + GONE_WITHIN_S + 5
        while status.get("phase") == "Serving" and time.monotonic() < deadline and any(
                "-evaluate-a" in p["metadata"]["name"] and p["metadata"]["labels"].get("ray.io/cluster")
                for p in _objects(cluster, "pods")):
            time.sleep(3)
    finally:
        stop.set()
        watcher.join(30)
        killer.join(30)
    wall = time.monotonic() - started
    d = disruptions
    _say(request, f"\n[cluster quickstart] deleted {d.killed_pod or 'no worker'} at distill step {d.killed_at_step} "
         f"{d.kill_missed}; distill steps reported {d.distill_steps}; suspended during quantize "
         f"(pods {d.suspended_stage_pods} gone after {d.pods_gone_after_s}s, phase {d.phase_while_suspended!r}), "
         f"resumed {d.resumed_at - d.suspended_at:.0f}s later; stage records "
         + json.dumps([{k: s.get(k) for k in ("name", "state", "attempt", "message")} for s in status.get("stages", [])]))
    _say(request, f"\n[cluster quickstart] {status.get('phase')} after {wall:.0f}s; phases {timeline.phases}; stages "
         + ", ".join(f"{n}: {s.get('startTime', '')[11:19]}-{s.get('endTime', '')[11:19]}" for n, s in sorted(timeline.rayjobs.items()))
         + f"\nkubectl get pods -A during distill:\n{timeline.pods_during_distill}\n")
    if status.get("phase") != "Serving":
        pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        events = cluster.kubectl("get", "events", "-n", NS, "--sort-by=.lastTimestamp", check=False).stdout[-6000:]
        logs = cluster.kubectl("logs", "-n", RELEASE_NS, "-l", "app.kubernetes.io/name=meddistill-operator",
                               "--tail=80", check=False).stdout
        pytest.fail(f"the job did not reach Serving in {wall:.0f}s: {json.dumps(status, indent=1)[:4000]}\n"
                    f"{pods}\n{events}\n{logs}")
    return QuickstartOnNode(cluster, timeline, disruptions, status, wall)


def test_stage_pods_are_made_by_the_kubelet_and_log(quickstart_on_node):
    t = quickstart_on_node.timeline
    assert {name.rsplit("-a", 1)[0].removeprefix(f"{JOB}-") for name in t.rayjobs} >= {
        "teacher", "distill", "quantize", "evaluate"}, t.rayjobs.keys()
    heads = [p for p, seen in t.pods_seen.items() if "-head-" in p]
    workers = [p for p, seen in t.pods_seen.items() if "-worker-" in p]
    assert heads and workers, t.pods_seen.keys()
    # The teacher stage's submitter pod followed the Ray job: Ray Data and Train's own lines.
    assert "Dataset" in t.stage_log or "step" in t.stage_log, t.stage_log[-2000:]
    assert "distill" in t.pods_during_distill and "Running" in t.pods_during_distill, t.pods_during_distill


def test_a_finished_stage_leaves_no_pods_after_a_minute(quickstart_on_node):
    t = quickstart_on_node.timeline
    assert t.succeeded_at, t.rayjobs
    late = {}
    for rayjob, done_at in t.succeeded_at.items():
        cluster_name = t.rayjobs[rayjob].get("rayClusterName", "")
        last_seen = max((seen["last"] for seen in t.pods_seen.values() if seen["cluster"] == cluster_name), default=0)
        if last_seen - done_at > GONE_WITHIN_S:
            late[rayjob] = round(last_seen - done_at)
    assert late == {}, f"pods of finished stages still there after {GONE_WITHIN_S}s: {late}"


def test_a_worker_killed_mid_distill_is_replaced_and_the_stage_still_succeeds(quickstart_on_node):
    q = quickstart_on_node
    d, t = q.disruptions, q.timeline
    assert d.killed_pod and not d.kill_missed, d.kill_missed or "the distill stage's worker pod never ran"
    # KubeRay re-created the worker: another worker pod of a distill cluster appeared after the kill.
    later = [p for p, seen in t.pods_seen.items() if "-distill-a" in p and "-worker-" in p and p != d.killed_pod
             and seen["first"] > d.killed_at]
    assert later, {p: round(seen["first"] - d.killed_at) for p, seen in t.pods_seen.items() if "-distill-a" in p}
    # The training ran again from its last checkpoint (none before the last step here: from step 0),
    # either in the same RayJob (Ray Train's FailureConfig) or in the operator's next attempt.
    steps = d.distill_steps
    assert d.killed_at_step in steps and any(steps[i] <= steps[i - 1] for i in range(1, len(steps))), steps
    distill = next(s for s in q.status["stages"] if s["name"] == "distill")
    assert distill["state"] == "Succeeded", distill


def test_suspend_removes_the_running_pods_and_resume_finishes_the_job(quickstart_on_node):
    q = quickstart_on_node
    d = q.disruptions
    assert d.suspended_at and d.suspended_stage_pods, "the quantize stage never ran to be suspended"
    assert d.phase_while_suspended == "Suspended"
    assert d.pods_gone_after_s is not None and d.pods_gone_after_s <= GONE_WITHIN_S, d
    assert d.resumed_at
    quantize = next(s for s in q.status["stages"] if s["name"] == "quantize")
    # A suspension is not a failure: the same attempt ran again after the resume.
    assert quantize["state"] == "Succeeded" and quantize["attempt"] == 1, quantize
    assert q.status["phase"] == "Serving"


def test_serving_head_with_its_autoscaler_is_admitted_under_restricted(quickstart_on_node):
    cluster = quickstart_on_node.cluster
    ns = json.loads(cluster.kubectl("get", "namespace", NS, "-o", "json").stdout)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    heads = [p for p in _objects(cluster, "pods") if p["metadata"]["labels"].get("ray.io/node-type") == "head"
             and p["metadata"]["labels"].get("ray.io/is-ray-node") == "yes"]
    serving = [p for p in heads if "autoscaler" in [c["name"] for c in p["spec"]["containers"]]]
    assert serving, [p["metadata"]["name"] for p in heads]
    assert serving[0]["status"]["phase"] == "Running"


def test_the_served_student_answers_through_its_service(request, quickstart_on_node):
    from openai import OpenAI

    cluster = quickstart_on_node.cluster
    svc = json.loads(cluster.kubectl("get", "service", f"{JOB}-serve-svc", "-n", NS, "-o", "json").stdout)
    # The node routes Service addresses (kube-proxy's rules), as a pod's traffic would be.
    base = f"http://{svc['spec']['clusterIP']}:8000/v1"
    client = OpenAI(base_url=base, api_key=cluster.token, timeout=180)
    reply = client.chat.completions.create(model="meddistill-student", max_tokens=64, temperature=0,
                                           messages=[{"role": "user", "content": "What is hypertension?"}])
    text = reply.choices[0].message.content
    _say(request, f"\n[cluster quickstart] What is hypertension? -> {text!r}\n")
    assert re.search(r"blood|pressure|heart|arter", text.lower()), text
    with pytest.raises(Exception, match="401|Unauthorized|auth"):
        OpenAI(base_url=base, api_key="wrong-token", timeout=60).chat.completions.create(
            model="meddistill-student", max_tokens=4, messages=[{"role": "user", "content": "hi"}])


def test_zz_deleting_the_job_leaves_nothing_behind(quickstart_on_node):
    cluster = quickstart_on_node.cluster
    cluster.kubectl("delete", "meddistilljob", JOB, "-n", NS, "--wait=true", timeout=300)
    kinds = ("pods", "services", "networkpolicies", "rayclusters.ray.io", "rayjobs.ray.io", "rayservices.ray.io")
    deadline, left = time.monotonic() + 180, {}
    while time.monotonic() < deadline:
        left = {k: [o["metadata"]["name"] for o in _objects(cluster, k)] for k in kinds}
        left["secrets"] = [o["metadata"]["name"] for o in _objects(cluster, "secrets")
                           if o["metadata"]["name"] != "quickstart-endpoint"]
        if not any(left.values()):
            break
        time.sleep(3)
    assert not any(left.values()), left
