"""KubeRay objects: stage runs as `ray.io/v1` RayJobs, the serving app as a RayService.

Two halves, both plain functions of plain data so they are tested without an API server:
- render: `rayjob(job, owner_uid, start)` and `rayservice(job, owner_uid, serve)` -> manifests;
- observe: `stage_run(rayjob)` and `serving_app(rayservice)` -> the planner's abstract children.
The planner never sees a KubeRay field; kuberay.py is the backend that sends and lists them.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version

import yaml

from meddistill.artifacts import PVC_ROOT, PVC_ROOT_ENV, PVC_SCHEME, pvc_claim
from meddistill.serve.config import TOKEN_ENV, render_serve_config_v2
from meddistill.spec.models import API_GROUP, API_VERSION, KIND, MedDistillJob, Resources, input_claims

from ..failures import redacted_failure
from ..planner import INVALID_RUN, Serve, ServingApp, ServingTarget, StageRun, StartStage
from ..sizing import entrypoint_resources, stage_resources
from .common import ATTEMPT_KEY, JOB_KEY, STAGE_KEY, job_document, stage_entrypoint

RAY_GROUP, RAY_VERSION = "ray.io", "v1"
RAYJOBS, RAYSERVICES = "rayjobs", "rayservices"
LABEL_JOB, LABEL_STAGE, LABEL_ATTEMPT = JOB_KEY, STAGE_KEY, ATTEMPT_KEY
ANNOTATION_MODEL = "meddistill.io/model-uri"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The head only schedules (Ray sees 0 CPUs there): it asks for a quarter CPU and may burst to one, so a
# small node fits a stage's head, submitter and a 1-CPU worker. Memory is not overcommitted.
HEAD_RESOURCES = {"requests": {"cpu": "250m", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
# A custom Ray resource only stage workers advertise: every stage driver asks for it, so Ray never
# places a driver on the head (which has 0 CPUs for Ray and 2Gi), even a coordinating one that
# reserves no CPU. The Ray-cluster backend cannot do this (it does not start that cluster's nodes).
DRIVER_RESOURCE = "meddistill_stage_driver"
# Stage and serving pods pass PodSecurity "restricted". They run as the image's own non-root user
# (Dockerfile: USER 65532, HOME /home/meddistill, cache in /tmp); fsGroup makes PVCs writable to it.
POD_UID = 65532
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": POD_UID, "runAsGroup": POD_UID, "fsGroup": POD_UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"runAsNonRoot": True, "runAsUser": POD_UID, "allowPrivilegeEscalation": False,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
# NCCL and DeepSpeed exchange tensors through /dev/shm; a container's default is 64Mi.
SHM_VOLUME, SHM_PATH = "dshm", "/dev/shm"
# Child Ray clusters run with Ray token authentication (KubeRay >= 1.5.1 `authOptions`, Ray >= 2.52).
# KubeRay makes each Ray cluster's token itself (a Secret named after the RayCluster, owned by it, key
# AUTH_SECRET_KEY), sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every Ray container and the submitter, and
# authenticates its own dashboard calls with it. The operator never creates, reads or lists a Secret for
# it: it needs no Secret verb at all (a cluster-wide `create` on Secrets lets its ServiceAccount mint a
# token for any ServiceAccount in any namespace).
AUTH_SECRET_KEY = "auth_token"
# The Ray ports of the job's pods (GCS, dashboard/Jobs API, client, raylets) admit only the job's own pods
# and the KubeRay operator (which polls the dashboard); Serve's 8000 stays open to the job's namespace.
RAY_PORTS, SERVE_PORT, DASHBOARD_PORT = (6379, 8265, 10001), 8000, 8265
KUBERAY_OPERATOR_POD = {"app.kubernetes.io/name": "kuberay-operator"}  # the KubeRay chart's pod label
INVALID_MESSAGE_CHARS = 600  # KubeRay's validation messages are one sentence about the spec
# The submitter pod only runs `ray job submit` and follows the logs: KubeRay's default limits
# (common/job.go), a smaller CPU request; restated so it can carry the securityContext.
SUBMITTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
# KubeRay's autoscaler container defaults to 500m/512Mi requested; it mostly sleeps between polls.
AUTOSCALER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}


# The operator's own image (the chart sets it): stage and serving pods of jobs that name no spec.image
# run it, so an air-gapped cluster sets its registry path once, in the chart.
IMAGE_ENV = "MEDDISTILL_IMAGE"
# The pull Secrets of that image (comma-separated names; the chart's imagePullSecrets): given to the
# pods that run it. A Secret is namespaced: one of each name must exist in every job namespace.
IMAGE_PULL_SECRETS_ENV = "MEDDISTILL_IMAGE_PULL_SECRETS"


def default_image() -> str:
    return os.environ.get(IMAGE_ENV) or f"ghcr.io/meddistill/meddistill:{version('meddistill')}"


def pod_image(job: MedDistillJob) -> str:
    return job.spec.image or default_image()


def _labels(job: MedDistillJob, component: str) -> dict[str, str]:
    return {
        LABEL_JOB: job.metadata.name,
        "app.kubernetes.io/name": "meddistill",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "meddistill-operator",
    }


def _owner(job: MedDistillJob, owner_uid: str) -> list[dict]:
    # controller + blockOwnerDeletion: the garbage collector removes children with the job.
    return [{"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": job.metadata.name,
             "uid": owner_uid, "controller": True, "blockOwnerDeletion": True}]


def _input_volume(claim: str) -> str:
    """A volume name (a DNS label, at most 63 characters) for an input claim (a DNS subdomain: may hold
    '.' and run to 253): `input-<claim>`, or a cut of it plus a hash of the claim, so names stay unique."""
    name = f"input-{claim}"
    if len(name) <= 63 and "." not in claim:
        return name
    cut = name[:54].replace(".", "-").rstrip("-")
    return f"{cut}-{hashlib.sha256(claim.encode()).hexdigest()[:8]}"


def _storage(job: MedDistillJob) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, volumeMounts, envFrom) giving pods the artifact store and the job's inputs.

    Every claim is mounted at PVC_ROOT/CLAIM, where pvc:// resolves (artifacts.pvc_path): the artifact
    claim read-write, each claim a model or dataset is read from (input_claims) read-only, so a stage
    cannot change a hospital's source data; a claim that is both is mounted once, read-write."""
    uri, volumes, mounts, env_from = job.spec.artifacts.uri, [], [], []
    store = pvc_claim(uri) if uri.startswith(PVC_SCHEME) else None
    if store:
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": store}})
        mounts.append({"name": "artifacts", "mountPath": f"{PVC_ROOT}/{store}"})
    for claim in input_claims(job.spec):
        if claim != store:
            name = _input_volume(claim)
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
            mounts.append({"name": name, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    if job.spec.artifacts.secret_name:
        env_from.append({"secretRef": {"name": job.spec.artifacts.secret_name}})
    return volumes, mounts, env_from


def _container(job: MedDistillJob, name: str, cpus: int, memory: str, gpus: int, requested_cpus: str = "") -> dict:
    """A Ray container; it requests what its limits say (KubeRay gives Ray the limits) unless
    requested_cpus asks for less CPU."""
    _, mounts, env_from = _storage(job)
    limits = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    requests = {**limits, "cpu": requested_cpus or str(cpus)}
    c = {"name": name, "image": pod_image(job), "resources": {"requests": requests, "limits": limits},
         "env": [{"name": PVC_ROOT_ENV, "value": PVC_ROOT}], "securityContext": CONTAINER_SECURITY,
         "volumeMounts": [{"name": SHM_VOLUME, "mountPath": SHM_PATH}, *mounts]}
    if env_from:
        c["envFrom"] = env_from
    return c


def _placement(job: MedDistillJob, stage: str) -> dict:
    """Pod spec fields from spec.scheduling for one stage (or "serving")."""
    s = job.spec.scheduling.for_stage(stage)
    # Stage code never calls the Kubernetes API: no ServiceAccount token in its pods unless asked for.
    out: dict = {"securityContext": POD_SECURITY, "automountServiceAccountToken": bool(s.automount_service_account_token)}
    if s.node_selector:
        out["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        out["tolerations"] = [{k: v for k, v in t.model_dump(by_alias=True).items() if v not in ("", None)}
                              for t in s.tolerations]
    if s.priority_class_name:
        out["priorityClassName"] = s.priority_class_name
    # The job's own list (even empty) wins; else pods running the operator's image get its pull Secrets.
    pull = s.image_pull_secrets if s.image_pull_secrets is not None else (
        [] if job.spec.image else [n for n in os.environ.get(IMAGE_PULL_SECRETS_ENV, "").split(",") if n])
    if pull:
        out["imagePullSecrets"] = [{"name": n} for n in pull]
    if s.service_account_name:
        out["serviceAccountName"] = s.service_account_name
    return out


def _pod_labels(job: MedDistillJob) -> dict:
    """Every pod of the job's Ray clusters carries its job label: the NetworkPolicy's peers."""
    return {"labels": {LABEL_JOB: job.metadata.name}}


def _pod(job: MedDistillJob, container: dict, stage: str) -> dict:
    volumes, _, _ = _storage(job)
    spec = {"containers": [container], **_placement(job, stage),
            "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory",
                                                         "sizeLimit": container["resources"]["limits"]["memory"]}},
                        *volumes]}
    return {"metadata": _pod_labels(job), "spec": spec}


def _submitter_pod(job: MedDistillJob, stage: str) -> dict:
    """KubeRay's default submitter pod plus the restricted securityContext (KubeRay fills the command)."""
    container = {"name": "ray-job-submitter", "image": pod_image(job), "resources": SUBMITTER_RESOURCES,
                 "securityContext": CONTAINER_SECURITY}
    return {"metadata": _pod_labels(job),
            "spec": {"containers": [container], "restartPolicy": "Never", **_placement(job, stage)}}


def head_network_policy(job: MedDistillJob, owner_uid: str, kuberay_namespaces: tuple[str, ...] = ()) -> dict:
    """Ingress to the job's Ray pods, head and workers (named for the head, whose ports matter most): any
    port from the job's own pods (workers, submitter: GCS, object transfer), the dashboard from the KubeRay
    operator (in kuberay_namespaces; any namespace when empty: the token still guards it), Serve's port from
    the namespace (Serve runs a proxy on every node, workers included). Nothing else reaches them."""
    own = {"podSelector": {"matchLabels": {LABEL_JOB: job.metadata.name}}}
    namespaces = ({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                         "values": list(kuberay_namespaces)}]} if kuberay_namespaces else {})
    kuberay = {"namespaceSelector": namespaces, "podSelector": {"matchLabels": dict(KUBERAY_OPERATOR_POD)}}
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{job.metadata.name}-ray-head", "namespace": job.metadata.namespace,
                     "labels": _labels(job, "network-policy"), "ownerReferences": _owner(job, owner_uid)},
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB: job.metadata.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own]},
                {"from": [kuberay], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
                {"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": SERVE_PORT}]},
            ],
        },
    }


def ray_start_resources(resources: dict[str, int]) -> str:
    """rayStartParams.resources as KubeRay writes it itself (common/pod.go): JSON in single quotes.
    KubeRay trims the quotes and parses the JSON (to add accelerators); the quotes keep it one word in
    the `ray start` shell command; Ray's autoscaler drops the first and last character and parses."""
    return "'" + json.dumps(resources) + "'"


def ray_version() -> str:
    """rayClusterSpec.rayVersion: the Ray installed beside the operator. The operator and every stage
    and serving pod run from the same image (Dockerfile), so this is the Ray the pods run. KubeRay
    needs it for token auth (>= 2.52) and picks its health probes by it."""
    try:
        installed = version("ray")
    except PackageNotFoundError as e:  # the operator's image always has Ray (a core dependency)
        raise RuntimeError("ray is not installed beside the operator: install meddistill with its dependencies") from e
    return installed.split("+")[0]


def ray_cluster_spec(job: MedDistillJob, stage: str, res: Resources, group: str, min_replicas: int, max_replicas: int,
                     replicas: int, worker_resources: dict[str, int] | None = None, worker_requested_cpus: str = "") -> dict:
    head = _container(job, "ray-head", int(HEAD_RESOURCES["limits"]["cpu"]), HEAD_RESOURCES["limits"]["memory"], 0,
                      requested_cpus=HEAD_RESOURCES["requests"]["cpu"])
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    worker = _container(job, "ray-worker", res.cpus_per_worker, res.memory, res.gpus_per_worker,
                        requested_cpus=worker_requested_cpus)
    return {
        "rayVersion": ray_version(),
        "authOptions": {"mode": "token"},
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": _pod(job, head, stage)},
        "workerGroupSpecs": [{
            "groupName": group, "replicas": replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "rayStartParams": {"resources": ray_start_resources(worker_resources)} if worker_resources else {},
            "template": _pod(job, worker, stage),
        }],
    }


def rayjob(job: MedDistillJob, owner_uid: str, start: StartStage) -> dict:
    """The RayJob of one stage attempt."""
    spec = job.spec
    res, driver = stage_resources(job, start.stage), entrypoint_resources(job, start.stage)
    labels = {**_labels(job, "stage"), LABEL_STAGE: start.stage, LABEL_ATTEMPT: str(start.attempt)}
    if spec.queue_name:
        labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    body = {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayJob",
        "metadata": {"name": start.name, "namespace": job.metadata.namespace, "labels": labels,
                     "ownerReferences": _owner(job, owner_uid)},
        "spec": {
            "entrypoint": stage_entrypoint(start.stage),
            # What the driver reserves: the Ray-cluster backend's numbers (sizing.entrypoint_resources).
            # KubeRay has no entrypoint memory (and Ray refuses "memory" in entrypointResources); a
            # driver that does the work reserves a whole worker's CPUs, so it has that pod's memory.
            "entrypointNumCpus": driver.num_cpus,
            "entrypointNumGpus": driver.num_gpus,
            "entrypointResources": json.dumps({DRIVER_RESOURCE: 1}),
            # The whole job document travels in the Ray runtime env, so the entrypoint is the same
            # command `meddistill run` uses in-process.
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {"MEDDISTILL_JOB": job_document(job)}}, width=1 << 30),
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": _submitter_pod(job, start.stage),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": spec.run_policy.ttl_seconds_after_finished,
            "rayClusterSpec": ray_cluster_spec(job, start.stage, res, "workers", res.workers, res.workers, res.workers,
                                               worker_resources={DRIVER_RESOURCE: 1}),
        },
    }
    if spec.run_policy.active_deadline_seconds:
        body["spec"]["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    if spec.queue_name:
        # Kueue admits a suspended RayJob by un-suspending it; we never touch spec.suspend again.
        body["spec"]["suspend"] = True
    return body


def serving_token_env(job: MedDistillJob) -> list[dict]:
    """Pod env bringing the bearer token from the job's Secret to where the app reads it (empty without auth)."""
    auth = job.spec.serving.auth
    if auth is None:
        return []
    return [{"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": auth.secret_name, "key": auth.key}}}]


def rayservice(job: MedDistillJob, owner_uid: str, serve: Serve) -> dict:
    """The RayService: one worker group that fits max_replicas Serve replicas, the token from its Secret."""
    s = job.spec.serving
    # A worker per replica, +1 CPU for the Serve proxy and metrics agent beside it: Ray sees the limit
    # (cpusPerReplica + 1) and places one replica per worker; the pod requests only cpusPerReplica,
    # since the proxy mostly waits.
    res = Resources(workers=1, gpus_per_worker=s.gpus_per_replica, cpus_per_worker=s.cpus_per_replica + 1,
                    memory="16Gi" if s.gpus_per_replica else "4Gi")
    replicas = s.initial_replicas if s.initial_replicas is not None else s.min_replicas
    cluster = ray_cluster_spec(job, "serving", res, "serve", min_replicas=s.min_replicas, max_replicas=s.max_replicas,
                               replicas=replicas, worker_requested_cpus=str(s.cpus_per_replica))
    cluster["enableInTreeAutoscaling"] = s.max_replicas > s.min_replicas
    if cluster["enableInTreeAutoscaling"]:
        # KubeRay adds an `autoscaler` container to the head; without this it has no securityContext
        # and a namespace enforcing PodSecurity "restricted" refuses the head pod.
        cluster["autoscalerOptions"] = {"securityContext": CONTAINER_SECURITY, "resources": AUTOSCALER_RESOURCES}
        # The autoscaler reads and patches its RayCluster through the API, as the ServiceAccount KubeRay
        # makes for it (a Role on this cluster only): the head needs that token, which stage pods never
        # get. Without it the autoscaler container dies at start ("no such file .../serviceaccount/token").
        cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] = True
    for pod in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        pod["spec"]["containers"][0]["env"] += serving_token_env(job)
    return {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayService",
        "metadata": {"name": serve.name, "namespace": job.metadata.namespace, "labels": _labels(job, "serving"),
                     "annotations": {ANNOTATION_MODEL: serve.model_uri}, "ownerReferences": _owner(job, owner_uid)},
        "spec": {"serveConfigV2": render_serve_config_v2(job, serve.model_uri), "rayClusterConfig": cluster},
    }


def rayservice_model_patch(job: MedDistillJob, serve: Serve) -> dict:
    """A merge patch pointing a RayService at a new model in place (KubeRay rolls it out)."""
    return {"metadata": {"annotations": {ANNOTATION_MODEL: serve.model_uri}},
            "spec": {"serveConfigV2": render_serve_config_v2(job, serve.model_uri)}}


def serving_target(job: MedDistillJob) -> ServingTarget:
    """The RayService is named after the job; KubeRay names its Serve Service `<rayservice>-serve-svc`."""
    name = job.metadata.name
    return ServingTarget(name=name, endpoint=f"http://{name}-serve-svc.{job.metadata.namespace or 'default'}.svc:8000/v1")


# --------------------------------------------------------------------------------------------
# Observe
# --------------------------------------------------------------------------------------------


def stage_run(obj: dict) -> StageRun | None:
    """A RayJob as the planner sees it (None when it is not one of our stage runs)."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    labels = meta.get("labels") or {}
    try:
        stage, attempt = labels[LABEL_STAGE], int(labels[LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None
    deploy, job_status = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    queue = labels.get(KUEUE_QUEUE_LABEL, "")
    if meta.get("deletionTimestamp"):
        state = "Deleting"
    elif deploy == "Complete" and job_status == "SUCCEEDED":
        state = "Succeeded"
    elif deploy in ("Failed", "ValidationFailed") or job_status in ("FAILED", "STOPPED"):
        state = "Failed"
    elif queue and (obj.get("spec") or {}).get("suspend"):
        # Kueue admits a RayJob by setting spec.suspend false, and preempts it by setting it true again.
        state = "Queued"
    elif deploy == "Running" or job_status == "RUNNING":
        state = "Running"
    else:  # "", New, Initializing, Waiting, Retrying
        state = "Pending"
    reason = status.get("reason", "") or (f"jobStatus {job_status}" if state == "Failed" and job_status else "")
    message = status.get("message", "")
    invalid = deploy == "ValidationFailed"
    if state == "Queued":
        message = f"queued: waiting for Kueue to admit it (LocalQueue {queue})"
    if invalid:
        # KubeRay refused the RayJob before creating anything (utils/validation.go): its message is
        # about our spec, not the job's logs, and no submitter Job exists to read logs from.
        message = f"KubeRay refused the RayJob: {message or 'invalid spec'}"[:INVALID_MESSAGE_CHARS]
    elif state == "Failed":  # KubeRay copies Ray's message, which ends with the job's last log lines
        name = meta.get("name", "")
        message = redacted_failure(message, "", f"kubectl logs -n {meta.get('namespace', '')} job/{name}")
    return StageRun(stage=stage, attempt=attempt, name=meta.get("name", ""), state=state,
                    reason=INVALID_RUN if invalid else reason, message=message,
                    start_time=status.get("startTime", ""), end_time=status.get("endTime", ""))


def serving_app(obj: dict) -> ServingApp:
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conds.get("Ready", {})
    return ServingApp(name=meta.get("name", ""), model_uri=(meta.get("annotations") or {}).get(ANNOTATION_MODEL, ""),
                      ready=ready.get("status") == "True", message=ready.get("message", ""),
                      deleting=bool(meta.get("deletionTimestamp")))
