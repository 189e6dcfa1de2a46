"""The KubeRay backend adapter: rendering RayJobs/RayServices and reading their status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from meddistill.operator.backends import kuberay_objects as kuberay
from meddistill.operator.planner import Serve, StartStage
from meddistill.spec.models import MedDistillJob

REPO = Path(__file__).resolve().parents[1]


def job(**spec) -> MedDistillJob:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["namespace"] = "team"
    doc["spec"].update(spec)
    return MedDistillJob.model_validate(doc)


def test_kueue_queue_label_and_created_suspended():
    body = kuberay.rayjob(job(queueName="gpu-queue"), "uid", StartStage("distill", 2, "quickstart-distill-a2"))
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert body["spec"]["suspend"] is True  # Kueue admits it by un-suspending
    assert body["metadata"]["labels"]["meddistill.io/attempt"] == "2"
    plain = kuberay.rayjob(job(), "uid", StartStage("distill", 1, "quickstart-distill-a1"))
    assert "suspend" not in plain["spec"] and "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_pvc_store_is_mounted_and_s3_secret_is_env_from():
    j = job(artifacts={"uri": "pvc://models/runs", "secretName": "s3-creds"},
            runPolicy={"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 60})
    body = kuberay.rayjob(j, "uid", StartStage("teacher", 1, "quickstart-teacher-a1"))
    assert body["spec"]["activeDeadlineSeconds"] == 7200 and body["spec"]["ttlSecondsAfterFinished"] == 60
    for group in (body["spec"]["rayClusterSpec"]["headGroupSpec"], body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]):
        pod = group["template"]["spec"]
        assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
        assert {"name": "artifacts", "mountPath": "/mnt/pvc/models"} in pod["containers"][0]["volumeMounts"]
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_gpu_workers_and_job_document():
    j = job(teacher={**job().spec.teacher.model_dump(by_alias=True, mode="json"),
                     "resources": {"workers": 4, "gpusPerWorker": 8, "cpusPerWorker": 16, "memory": "200Gi"}})
    body = kuberay.rayjob(j, "uid", StartStage("teacher", 1, "quickstart-teacher-a1"))
    workers = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "8"}
    sent = json.loads(yaml.safe_load(body["spec"]["runtimeEnvYAML"])["env_vars"]["MEDDISTILL_JOB"])
    assert MedDistillJob.model_validate(sent).spec == j.spec  # the stage gets exactly this job


def test_rayservice_autoscaling_and_in_place_model_patch():
    j = job(serving={"minReplicas": 1, "maxReplicas": 3, "initialReplicas": 2, "auth": {"secretName": "api-token"}})
    body = kuberay.rayservice(j, "uid", Serve("quickstart", "/runs/quickstart/quantize"))
    cluster = body["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    # The autoscaler container talks to the API server as KubeRay's autoscaler ServiceAccount; worker
    # pods (Serve replicas) and stage pods never get a token.
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["automountServiceAccountToken"] is False
    fixed = kuberay.rayservice(job(serving={"minReplicas": 2, "maxReplicas": 2}), "uid", Serve("q", "/runs/q/quantize"))
    assert fixed["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert (cluster["workerGroupSpecs"][0]["minReplicas"], cluster["workerGroupSpecs"][0]["replicas"],
            cluster["workerGroupSpecs"][0]["maxReplicas"]) == (1, 2, 3)
    env = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    assert any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "api-token" for e in env)
    assert "/runs/quickstart/quantize" in body["spec"]["serveConfigV2"]
    patch = kuberay.rayservice_model_patch(j, Serve("quickstart", "/runs/v2/quantize"))
    assert "/runs/v2/quantize" in patch["spec"]["serveConfigV2"]
    assert kuberay.serving_app({**body, "metadata": {**body["metadata"], **patch["metadata"]}}).model_uri == "/runs/v2/quantize"


@pytest.mark.parametrize("status,state", [
    ({}, "Pending"),
    ({"jobDeploymentStatus": "Initializing"}, "Pending"),
    ({"jobDeploymentStatus": "Suspended"}, "Pending"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, "Failed"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "Failed"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "Failed"),
    ({"jobDeploymentStatus": "ValidationFailed"}, "Failed"),
])
def test_rayjob_status_to_stage_run_state(status, state):
    obj = {"metadata": {"name": "j-teacher-a1", "labels": {"meddistill.io/stage": "teacher", "meddistill.io/attempt": "1"}},
           "status": status}
    run = kuberay.stage_run(obj)
    assert (run.stage, run.attempt, run.state) == ("teacher", 1, state)
    if status.get("reason"):
        assert run.reason == status["reason"]


def test_foreign_or_deleting_rayjobs():
    assert kuberay.stage_run({"metadata": {"name": "x", "labels": {}}}) is None
    deleting = {"metadata": {"name": "j-teacher-a1", "deletionTimestamp": "2026-01-01T00:00:00Z",
                             "labels": {"meddistill.io/stage": "teacher", "meddistill.io/attempt": "1"}}}
    assert kuberay.stage_run(deleting).state == "Deleting"


def example(name: str) -> MedDistillJob:
    return MedDistillJob.model_validate(yaml.safe_load((REPO / "examples" / name).read_text()))


def rayjob_schema() -> dict:
    crd = yaml.safe_load((REPO / "tests" / "fixtures" / "kuberay-crds" / "ray.io_rayjobs.yaml").read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("example_file", ["quickstart.yaml", "deepseek-r1-70b-to-7b.yaml"])
def test_stage_drivers_reserve_what_the_ray_backend_reserves_and_never_land_on_the_head(example_file):
    import jsonschema
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    from meddistill.operator.backends import raycluster_objects as raybackend
    from meddistill.spec.models import pipeline_stages

    j, schema = example(example_file), rayjob_schema()
    validator, known = jsonschema.Draft7Validator(schema), set(schema["properties"]["spec"]["properties"])
    for stage in pipeline_stages(j.spec):
        start = StartStage(stage, 1, f"{j.metadata.name}-{stage}-a1")
        body, sub = kuberay.rayjob(j, "uid", start), raybackend.submission(j, "uid", start)
        validator.validate(body)  # the field names and types of KubeRay v1.7's RayJob
        spec = body["spec"]
        assert set(spec) <= known  # the API server would silently prune an unknown field
        assert (spec["entrypointNumCpus"], spec["entrypointNumGpus"]) == (sub["entrypoint_num_cpus"], sub["entrypoint_num_gpus"])
        # Every driver asks for a resource only stage workers advertise (the head has 0 CPUs, 2Gi).
        wanted = json.loads(spec["entrypointResources"])
        workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
        offered = _get_custom_resources({}, workers["rayStartParams"], "workers")  # how Ray reads the param
        assert wanted and all(offered.get(name, 0) >= amount for name, amount in wanted.items())
        assert "resources" not in spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    # quantize works in its driver: it reserves one worker's CPUs and GPUs (its whole pod).
    quant = kuberay.rayjob(j, "uid", StartStage("quantize", 1, "q"))["spec"]
    worker = quant["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert quant["entrypointNumCpus"] == int(worker["cpu"]) == j.spec.teacher.resources.cpus_per_worker
    assert quant["entrypointNumGpus"] == int(worker.get("nvidia.com/gpu", 0)) == j.spec.teacher.resources.gpus_per_worker


def test_scheduling_is_job_wide_with_per_stage_overrides():
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    j = job(scheduling={"nodeSelector": {"pool": "cpu"}, "priorityClassName": "batch", "imagePullSecrets": ["regcred"],
                        "stages": {"teacher": {"nodeSelector": {"pool": "a100"}, "tolerations": [gpu_taint]},
                                   "serving": {"serviceAccountName": "serve-sa", "automountServiceAccountToken": True}}})
    teacher = kuberay.rayjob(j, "uid", StartStage("teacher", 1, "quickstart-teacher-a1"))["spec"]
    for pod in (teacher["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"], teacher["submitterPodTemplate"]["spec"]):
        assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"] == [gpu_taint]
        assert pod["priorityClassName"] == "batch" and pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    quant = kuberay.rayjob(j, "uid", StartStage("quantize", 1, "quickstart-quantize-a1"))["spec"]
    head = quant["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in head
    serving = kuberay.rayservice(j, "uid", Serve("quickstart", "/runs/q"))["spec"]["rayClusterConfig"]
    pod = serving["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["serviceAccountName"] == "serve-sa" and pod["automountServiceAccountToken"] is True
    assert pod["nodeSelector"] == {"pool": "cpu"}


def test_pods_running_the_operators_image_get_the_charts_pull_secrets(monkeypatch):
    """MEDDISTILL_IMAGE_PULL_SECRETS (the chart's imagePullSecrets) reaches every pod of a job without
    spec.image: head, worker, submitter, serving; a job naming its own pull Secrets or image does not get them."""
    monkeypatch.setenv(kuberay.IMAGE_PULL_SECRETS_ENV, "regcred,mirror")

    def pods(j):
        stage = kuberay.rayjob(j, "uid", StartStage("teacher", 1, "quickstart-teacher-a1"))["spec"]
        serving = kuberay.rayservice(j, "uid", Serve("quickstart", "/runs/q"))["spec"]["rayClusterConfig"]
        return [c["headGroupSpec"]["template"]["spec"] for c in (stage["rayClusterSpec"], serving)] + \
               [c["workerGroupSpecs"][0]["template"]["spec"] for c in (stage["rayClusterSpec"], serving)] + \
               [stage["submitterPodTemplate"]["spec"]]

    for pod in pods(job()):
        assert pod["containers"][0]["image"] == kuberay.default_image()
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    for pod in pods(job(scheduling={"imagePullSecrets": ["own"]})):  # the job's own list wins
        assert pod["imagePullSecrets"] == [{"name": "own"}]
    for pod in pods(job(image="registry.example/custom:1")):  # another image: the chart's Secrets are not its
        assert "imagePullSecrets" not in pod
    monkeypatch.delenv(kuberay.IMAGE_PULL_SECRETS_ENV)
    assert all("imagePullSecrets" not in pod for pod in pods(job()))
