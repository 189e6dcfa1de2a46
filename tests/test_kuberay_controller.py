"""What the operator renders, accepted by KubeRay's real controller (not only its CRD schema).

KubeRay validates more than its schema says (utils/validation.go: token auth needs a rayVersion,
rayStartParams are parsed, the autoscaler's container is built from autoscalerOptions) and then
builds RayClusters, Services and Pods from our templates. Here its own controller, built from the Go
module proxy by tools/kube/build.sh, runs against a real control plane with that release's own CRDs,
in a namespace that enforces PodSecurity "restricted". Every stage's RayJob of the quickstart and of
the production example, and the RayService with autoscaling on, must reach KubeRay's next state:
a RayCluster, its head Service, and head and worker Pods the API server admitted, with no
ValidationFailed, no Invalid* event and no controller error about them. There is no kubelet here:
the pods stay Pending (tests/test_kube_node.py runs them).
"""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import yaml

from meddistill.operator.backends import kuberay_objects as kuberay
from meddistill.operator.planner import Serve, StartStage
from meddistill.spec.models import MedDistillJob, MedDistillJobStatus, pipeline_stages
from tests.support.kube_cluster import KubeCluster, ensure_binaries
from tests.test_operator_kube import install_crd, wait_for

pytestmark = pytest.mark.kube
REPO = Path(__file__).resolve().parents[1]
# Errors a controller logs and then retries, which say nothing about our objects: a concurrent write,
# and the RayService controller looking for the head pod before the RayCluster controller made it
# (the tests wait until that pod exists, so a head that is never made still fails them).
BENIGN = r"the object has been modified; please apply your changes|already exists|found 0 head\. cluster name"


@pytest.fixture(scope="module")
def kuberay_cluster():
    binaries = ensure_binaries()
    crds = binaries["kuberay-operator"].parent / "crds"
    cluster = KubeCluster(binaries, kuberay_crds_dir=crds)
    cluster.start()
    try:
        cluster.start_kuberay()
        install_crd(cluster)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def restricted_ns(kuberay_cluster):
    ns = f"kr-{uuid.uuid4().hex[:6]}"
    kuberay_cluster.kubectl("create", "namespace", ns)
    kuberay_cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
                            "pod-security.kubernetes.io/enforce-version=latest")
    yield ns
    kuberay_cluster.kubectl("delete", "namespace", ns, "--wait=false")


def kuberay_version(cluster) -> str:
    return cluster.bin("kuberay-operator").parent.name.removeprefix("kuberay-operator-")


def create_job(cluster, ns: str, example: str, **spec_updates) -> tuple[MedDistillJob, str]:
    """The example as a MedDistillJob object in `ns` (the owner of what is rendered for it), and its uid."""
    doc = yaml.safe_load((REPO / "examples" / example).read_text())
    doc["metadata"]["namespace"] = ns
    doc["spec"]["artifacts"] = {**doc["spec"].get("artifacts", {}), "uri": "pvc://meddistill-runs/runs"}
    doc["spec"].update(spec_updates)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    obj = json.loads(cluster.kubectl("get", "mdj", doc["metadata"]["name"], "-n", ns, "-o", "json").stdout)
    job = MedDistillJob.model_validate({**doc, "metadata": {**doc["metadata"], "uid": obj["metadata"]["uid"]}})
    return job, obj["metadata"]["uid"]


def assert_token_from_kuberay(cluster, ns: str, built: dict) -> None:
    """Token auth as KubeRay does it: it made the RayCluster's token Secret (named after the cluster,
    owned by it) and the head's Ray container reads RAY_AUTH_TOKEN from it; the operator made none."""
    rc = built["raycluster"]
    secret = json.loads(cluster.kubectl("get", "secret", rc, "-n", ns, "-o", "json").stdout)
    assert [o["kind"] for o in secret["metadata"]["ownerReferences"]] == ["RayCluster"]
    assert set(secret["data"]) == {kuberay.AUTH_SECRET_KEY}
    head = next(p for p in built["pods"] if p["metadata"]["labels"]["ray.io/node-type"] == "head")
    env = {e["name"]: e for e in head["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": rc, "key": kuberay.AUTH_SECRET_KEY}


def get(cluster, ns: str, kind: str, selector: str = "") -> list[dict]:
    args = ["get", kind, "-n", ns, "-o", "json"] + (["-l", selector] if selector else [])
    return json.loads(cluster.kubectl(*args).stdout)["items"]


def built_by_kuberay(cluster, ns: str, cluster_name_prefix: str) -> dict | None:
    """The RayCluster KubeRay made for our object, once its head Service and head and worker pods exist."""
    rcs = [c for c in get(cluster, ns, "rayclusters") if c["metadata"]["name"].startswith(cluster_name_prefix)]
    if not rcs:
        return None
    rc = rcs[0]["metadata"]["name"]
    pods = get(cluster, ns, "pods", f"ray.io/cluster={rc}")
    types = {p["metadata"]["labels"].get("ray.io/node-type") for p in pods}
    services = get(cluster, ns, "services", f"ray.io/cluster={rc}")
    if {"head", "worker"} <= types and services:
        return {"raycluster": rc, "pods": pods, "services": services}
    return None


def wait_built(cluster, ns: str, prefix: str, what: str) -> dict:
    try:
        return wait_for(lambda: built_by_kuberay(cluster, ns, prefix), 90, what)
    except AssertionError as err:  # say what KubeRay or the API server said instead
        raise AssertionError(f"{err}:\n" + "\n".join(refusals(cluster, ns, [prefix]))) from None


def refusals(cluster, ns: str, names: list[str]) -> list[str]:
    """Warnings KubeRay raised about our objects, and its log's error lines naming them."""
    events = get(cluster, ns, "events")
    bad = [f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['reason']}: {e['message']}"
           for e in events if e["type"] == "Warning" and re.search(r"Invalid|Validation|FailedCreate", e["reason"])]
    for line in cluster.logs("kuberay-operator", 5000).splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        text = json.dumps(entry)
        if re.search(BENIGN, text):
            continue
        if entry.get("level") == "error" and ns in text and any(n in text for n in names):
            bad.append(f"controller: {entry.get('msg')}: {entry.get('error', '')}"[:400])
    return bad


@pytest.mark.parametrize("example", ["quickstart.yaml", "deepseek-r1-70b-to-7b.yaml"])
def test_every_stage_rayjob_is_accepted_and_built_by_kuberay(kuberay_cluster, restricted_ns, example):
    job, uid = create_job(kuberay_cluster, restricted_ns, example)
    names = []
    for stage in pipeline_stages(job.spec):
        start = StartStage(stage, 1, f"{job.metadata.name}-{stage}-a1"[:47])
        body = kuberay.rayjob(job, uid, start)
        assert body["spec"]["rayClusterSpec"]["rayVersion"] == kuberay.ray_version()
        kuberay_cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(body))
        if body["spec"].get("suspend"):  # spec.queueName: created suspended; Kueue admits it by un-suspending
            kuberay_cluster.kubectl("patch", "rayjob", start.name, "-n", restricted_ns, "--type=merge",
                                    "-p", '{"spec": {"suspend": false}}')
        names.append(start.name)
    for name in names:
        built = wait_built(kuberay_cluster, restricted_ns, name,
                           f"KubeRay {kuberay_version(kuberay_cluster)} to build {name}'s RayCluster, Service and pods")
        rayjob = json.loads(kuberay_cluster.kubectl("get", "rayjob", name, "-n", restricted_ns, "-o", "json").stdout)
        status = rayjob.get("status") or {}
        assert status.get("jobDeploymentStatus") not in ("ValidationFailed", "Failed"), status
        head = next(p for p in built["pods"] if p["metadata"]["labels"]["ray.io/node-type"] == "head")
        # KubeRay parsed our worker resources and kept the driver off the head.
        command = " ".join(next(p for p in built["pods"] if p["metadata"]["labels"]["ray.io/node-type"] == "worker")
                           ["spec"]["containers"][0]["args"])
        assert "--resources='{\"meddistill_stage_driver\": 1}'" in command, command
        assert "meddistill_stage_driver" not in " ".join(head["spec"]["containers"][0]["args"])
        assert_token_from_kuberay(kuberay_cluster, restricted_ns, built)
    bad = refusals(kuberay_cluster, restricted_ns, names)
    assert bad == [], "\n".join(bad)


def test_serving_rayservice_with_autoscaling_is_accepted_and_its_head_admitted_under_restricted(
        kuberay_cluster, restricted_ns):
    job, uid = create_job(kuberay_cluster, restricted_ns, "quickstart.yaml")
    assert job.spec.serving.max_replicas > job.spec.serving.min_replicas  # the default: autoscaling on
    body = kuberay.rayservice(job, uid, Serve(job.metadata.name, "pvc://meddistill-runs/runs/quickstart/quantize"))
    kuberay_cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(body))
    built = wait_built(kuberay_cluster, restricted_ns, f"{job.metadata.name}-",
                       "KubeRay to build the RayService's RayCluster, Service and pods")
    head = next(p for p in built["pods"] if p["metadata"]["labels"]["ray.io/node-type"] == "head")
    containers = {c["name"]: c for c in head["spec"]["containers"]}
    assert "autoscaler" in containers, sorted(containers)  # admitted by the "restricted" namespace
    assert containers["autoscaler"]["securityContext"]["allowPrivilegeEscalation"] is False
    assert_token_from_kuberay(kuberay_cluster, restricted_ns, built)
    # KubeRay probes by rayVersion: HTTP where Ray has one health endpoint, else commands the image must have.
    probes = json.dumps([c.get("readinessProbe") for p in built["pods"] for c in p["spec"]["containers"]])
    for tool in ("wget", "curl"):
        if tool in probes:
            # tools/image/install.sh: what goes into the image, for the Dockerfile and the local build alike
            assert re.search(rf"apt-get install [^\n]*\b{tool}\b", (REPO / "tools/image/install.sh").read_text()), \
                f"KubeRay's probes run {tool}, which the image lacks: {probes[:300]}"
    bad = refusals(kuberay_cluster, restricted_ns, [job.metadata.name])
    assert bad == [], "\n".join(bad)


def test_an_invalid_rayjob_fails_once_with_kuberays_message_and_is_not_retried(kuberay_cluster, restricted_ns):
    """What KubeRay says about a spec it refuses reaches the job's status as it is, and the planner
    stops instead of burning retries on the same refusal."""
    from datetime import datetime, timezone

    from meddistill.operator.planner import Observed, plan

    job, uid = create_job(kuberay_cluster, restricted_ns, "quickstart.yaml")
    body = kuberay.rayjob(job, uid, StartStage("teacher", 1, "quickstart-teacher-a1"))
    del body["spec"]["rayClusterSpec"]["rayVersion"]  # what the operator rendered before this fix
    kuberay_cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(body))

    def refused():
        obj = json.loads(kuberay_cluster.kubectl("get", "rayjob", "quickstart-teacher-a1", "-n", restricted_ns,
                                                 "-o", "json").stdout)
        return obj if (obj.get("status") or {}).get("jobDeploymentStatus") == "ValidationFailed" else None

    run = kuberay.stage_run(wait_for(refused, 60, "KubeRay to refuse the RayJob without rayVersion"))
    assert run.state == "Failed" and run.reason == "InvalidRun"
    assert "RayVersion was not specified" in run.message and "kubectl logs" not in run.message
    now = datetime.now(timezone.utc)
    first = plan(job, Observed(runs=(run,)), now)
    teacher = next(s for s in first.status["stages"] if s["name"] == "teacher")
    assert first.status["phase"] == "Failed" and teacher["state"] == "Failed" and not first.create
    assert "RayVersion was not specified" in teacher["message"]
    assert [e.reason for e in first.events if e.type == "Warning"] == ["StageFailed", "JobFailed"]
    again = plan(job.model_copy(update={"status": MedDistillJobStatus.model_validate(first.status)}),
                 Observed(runs=(run,)), now)
    assert again.status["phase"] == "Failed" and not again.create
    assert not [e for e in again.events if e.type == "Warning"]  # said once
