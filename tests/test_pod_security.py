"""Every pod the operator has KubeRay create passes PodSecurity "restricted" on a real API server.

PodSecurity admission checks Pods, not RayJob/RayService custom resources, so each pod template a
child carries (head, worker groups, the RayJob's submitter) is sent as the Pod KubeRay would make
of it, with `kubectl apply --dry-run=server`, into a namespace that enforces "restricted"; the
children themselves are dry-run applied too (KubeRay's CRD schema accepts them).
"""
from __future__ import annotations

import uuid

import pytest
import yaml

from meddistill.operator.backends import kuberay_objects as kuberay
from meddistill.operator.planner import Serve, StartStage
from meddistill.spec.models import MedDistillJob, pipeline_stages
from tests.support.kube_cluster import REPO_ROOT

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


def hospital_job() -> MedDistillJob:
    """The quickstart with every pod-shaping option on: PVC store, inputs on claims (mounted read-only),
    S3 secret, serving token, Kueue, scheduling."""
    doc = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": "ward", "namespace": "team-a"}
    doc["spec"]["artifacts"] = {"uri": "pvc://models/runs", "secretName": "s3-creds"}
    doc["spec"]["teacher"]["model"] = "pvc://hospital-models/smollm2-135m"
    doc["spec"]["evaluation"]["datasets"].append("jsonl:pvc://hospital-data/eval.jsonl")
    doc["spec"]["serving"]["auth"] = {"secretName": "api-token"}
    doc["spec"]["queueName"] = "gpu-queue"
    doc["spec"]["scheduling"] = {"priorityClassName": "medical-batch", "imagePullSecrets": ["regcred"],
                                 "stages": {"teacher": {"nodeSelector": {"pool": "a100"}, "tolerations": [
                                     {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}
    return MedDistillJob.model_validate(doc)


def children(job: MedDistillJob) -> list[dict]:
    stages = [kuberay.rayjob(job, "uid-1", StartStage(s, 1, f"ward-{s}-a1")) for s in pipeline_stages(job.spec)]
    return stages + [kuberay.rayservice(job, "uid-1", Serve("ward", "pvc://models/runs/ward/quantize"))]


def pod_templates(child: dict) -> dict[str, dict]:
    spec = child["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({f"worker-{g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    if "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]
    return out


@pytest.fixture(scope="module")
def restricted_namespace(kube_cluster):
    ns = f"restricted-{uuid.uuid4().hex[:8]}"
    kube_cluster.kubectl("create", "namespace", ns)
    kube_cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    # Priority admission refuses a pod naming a PriorityClass that does not exist.
    kube_cluster.kubectl("create", "priorityclass", "medical-batch", "--value=1000", check=False)
    yield ns
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def dry_run_apply(cluster, ns: str, obj: dict):
    obj = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k not in ("namespace", "ownerReferences")}}
    return cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=yaml.safe_dump(obj), check=False)


def test_the_namespace_really_enforces_restricted(kube_cluster, restricted_namespace):
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
             "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    res = dry_run_apply(kube_cluster, restricted_namespace, plain)
    assert res.returncode != 0 and 'violates PodSecurity "restricted' in res.stderr, res.stderr


def test_every_rendered_pod_is_admitted_under_restricted(kube_cluster, restricted_namespace):
    refused, unsafe, checked = {}, [], 0
    for child in children(hospital_job()):
        res = dry_run_apply(kube_cluster, restricted_namespace, child)
        assert res.returncode == 0, f"{child['kind']} {child['metadata']['name']}: {res.stderr}"
        for role, template in pod_templates(child).items():
            name = f"{child['metadata']['name']}-{role}"
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": template["spec"]}
            res = dry_run_apply(kube_cluster, restricted_namespace, pod)
            checked += 1
            if res.returncode != 0:
                refused[name] = res.stderr.strip()
            # What PodSecurity does not check: no API token in the pod, a real /dev/shm for NCCL.
            spec = template["spec"]
            # The one exception: an autoscaling serving head, whose autoscaler container calls the API
            # as KubeRay's autoscaler ServiceAccount (it cannot start without the token).
            autoscaling_head = role == "head" and child["kind"] == "RayService" and \
                child["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling")
            if spec.get("automountServiceAccountToken") is not (True if autoscaling_head else False):
                unsafe.append(f"{name}: ServiceAccount token {'missing' if autoscaling_head else 'mounted'}")
            shm = [v for v in spec.get("volumes", []) if v["name"] == kuberay.SHM_VOLUME]
            mounted = {"name": kuberay.SHM_VOLUME, "mountPath": "/dev/shm"} in spec["containers"][0].get("volumeMounts", [])
            if role != "submitter" and not (shm and shm[0]["emptyDir"]["medium"] == "Memory" and mounted):
                unsafe.append(f"{name}: no in-memory /dev/shm")
    assert refused == {}, "\n".join(f"{k}: {v}" for k, v in refused.items())
    assert unsafe == []
    assert checked == 3 * len(pipeline_stages(hospital_job().spec)) + 2  # head+worker+submitter per stage, serving head+worker


def test_pods_run_as_the_images_user():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert f"USER {kuberay.POD_UID}:{kuberay.POD_UID}" in dockerfile  # HOME and caches belong to this uid
