"""Ray-cluster objects: stage runs as Ray Jobs API submissions, the serving app as a Ray Serve
application on an existing Ray cluster the platform team listed (ray_clusters.py).

Like kuberay_objects.py, plain functions of plain data (tested without a cluster): names, render
and observe. raycluster.py is the backend that sends and lists them. The same planner drives both
backends: it only sees StageRun / ServingApp.

Names (deterministic, so a restarted operator finds what it started instead of duplicating it):
- submission id `<namespace>_<job>_<stage>_a<attempt>` ('_' is in no namespace or job name, so
  namespace `a-b` + job `c` and namespace `a` + job `b-c` differ), job metadata
  `{meddistill.io/job: <ns>/<name>, meddistill.io/uid, meddistill.io/stage, meddistill.io/attempt}`;
- Serve app `mdj_<namespace>_<job>` at route prefix `/<namespace>/<job>`, so the endpoint is
  `http://<ray host>:<serve port>/<namespace>/<job>/v1`. A job with serving.replaces deploys to the
  replaced job's app and records itself as its owner (`MEDDISTILL_SERVED_BY` in the app's runtime_env).

A Ray job that is STOPPED counts as a deleted child (a suspension or a deletion stopped it): the
planner waits for it to be gone and then re-creates the same attempt, as with a deleted RayJob.
"""

from __future__ import annotations

from datetime import datetime, timezone

import yaml

from meddistill.serve.auth import TOKEN_SHA256_ENV, token_digest
from meddistill.serve.config import render_serve_config_v2
from meddistill.spec.models import MedDistillJob

from ..failures import RAY_CLUSTER_UNAVAILABLE, SECRET_UNAVAILABLE, ReconcileBlocked, redacted_failure
from ..planner import Serve, ServingApp, StageRun, StartStage
from ..sizing import entrypoint_resources
from .common import ATTEMPT_KEY, JOB_KEY, STAGE_KEY, UID_KEY, job_document, stage_entrypoint

META_JOB, META_UID, META_STAGE, META_ATTEMPT = JOB_KEY, UID_KEY, STAGE_KEY, ATTEMPT_KEY
APP_PREFIX = "mdj_"
SERVED_BY_ENV = "MEDDISTILL_SERVED_BY"  # in the app's runtime_env: "ns/job" that owns it
SEP = "_"  # in no Kubernetes namespace or object name: ids built with it cannot collide across namespaces


class RayBackendError(ReconcileBlocked):
    """The Ray cluster refused or cannot do what the plan asks (the message says how to fix it)."""

    reason = RAY_CLUSTER_UNAVAILABLE


class SecretUnavailable(RayBackendError):
    """A Secret the job names is missing, unreadable or lacks its key (the message names field and fix)."""

    reason = SECRET_UNAVAILABLE


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def submission_id(namespace: str, job: str, stage: str, attempt: int) -> str:
    return SEP.join((namespace, job, stage, f"a{attempt}"))


def app_name(namespace: str, job: str) -> str:
    return f"{APP_PREFIX}{namespace}{SEP}{job}"


def route_prefix(namespace: str, job: str) -> str:
    # The route holds namespace and name unambiguously (names have no '/'): the garbage
    # collector reads the owning job back from it.
    return f"/{namespace}/{job}"


def served_job(job: MedDistillJob) -> str:
    """Whose app this job deploys to: its own, or the one serving.replaces takes over (same namespace)."""
    return job.spec.serving.replaces or job.metadata.name


def job_of_route(route: str) -> tuple[str, str] | None:
    parts = route.strip("/").split("/")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def dashboard_address(address: str) -> str:
    """The Jobs/Serve REST address; `ray://` (Ray Client) has neither, so it is refused clearly."""
    if not address.startswith(("http://", "https://")):
        raise RayBackendError(
            f"Ray cluster address {address!r}: the operator talks to the Ray dashboard (Jobs API and Serve REST "
            f"API); set it to the dashboard URL, e.g. http://<head>:8265")
    return address.rstrip("/")


# --------------------------------------------------------------------------------------------
# Render
# --------------------------------------------------------------------------------------------


def secret_refs(job: MedDistillJob, serving: bool) -> dict[str, str]:
    """{spec field: Secret name} whose values a run on a Ray cluster needs (no pod to mount them in)."""
    refs = {}
    if job.spec.artifacts.secret_name:
        refs["spec.artifacts.secretName"] = job.spec.artifacts.secret_name
    if serving and job.spec.serving.auth is not None:
        refs["spec.serving.auth.secretName"] = job.spec.serving.auth.secret_name
    return refs


def secret_env(job: MedDistillJob, secrets: dict[str, dict[str, str]], serving: bool) -> dict[str, str]:
    """Environment a stage (serving=False) or the Serve app (True) gets from the job's Secrets.

    `secrets` maps a Secret's name to its decoded data. As on KubeRay: every key of
    artifacts.secretName (envFrom). For serving, only the bearer token's SHA-256 (serve/auth.py): Ray
    returns an app's runtime_env to every holder of the cluster's token, and the digest is all a replica
    needs to check a request.
    """
    env = {}
    if job.spec.artifacts.secret_name:
        env.update(secrets[job.spec.artifacts.secret_name])
    auth = job.spec.serving.auth if serving else None
    if auth is not None:
        data = secrets[auth.secret_name]
        if not data.get(auth.key, "").strip():
            raise SecretUnavailable(
                f"Secret {auth.secret_name!r} has no non-empty key {auth.key!r} (spec.serving.auth.key; it has: "
                f"{', '.join(sorted(data)) or 'no keys'}): add the token under that key or point spec.serving.auth.key at one")
        env[TOKEN_SHA256_ENV] = token_digest(data[auth.key])
    return env


def submission(job: MedDistillJob, uid: str, start: StartStage, env: dict[str, str] | None = None) -> dict:
    """Keyword arguments of `JobSubmissionClient.submit_job` for one stage attempt (env: secret_env)."""
    ns, name = job.metadata.namespace or "default", job.metadata.name
    driver = entrypoint_resources(job, start.stage)  # the same numbers the KubeRay RayJob gets
    return {
        # The same entrypoint and job document the KubeRay RayJob gets (and `meddistill run` calls).
        "entrypoint": stage_entrypoint(start.stage),
        "submission_id": submission_id(ns, name, start.stage, start.attempt),
        "runtime_env": {"env_vars": {**(env or {}), "MEDDISTILL_JOB": job_document(job)}},
        "metadata": {META_JOB: f"{ns}/{name}", META_UID: uid, META_STAGE: start.stage, META_ATTEMPT: str(start.attempt)},
        "entrypoint_num_cpus": driver.num_cpus,
        "entrypoint_num_gpus": driver.num_gpus,
        "entrypoint_memory": driver.memory_bytes,
    }


def serve_application(job: MedDistillJob, serve: Serve, env: dict[str, str] | None = None) -> dict:
    """Our app in a Serve deploy config: the RayService's serveConfigV2 app, renamed and routed per job.

    env (secret_env) goes into the app's runtime_env: what a RayService pod gets from its Secrets.
    """
    ns, name, target = job.metadata.namespace or "default", job.metadata.name, served_job(job)
    app = yaml.safe_load(render_serve_config_v2(job, serve.model_uri))["applications"][0]
    app = {**app, "name": app_name(ns, target), "route_prefix": route_prefix(ns, target)}
    # serving.replaces moves the app to this job: the new owner travels with it (Serve keeps the deployed
    # config as sent), read back by garbage collection and by the replaced job (app_owner).
    env = {**(env or {}), **({SERVED_BY_ENV: f"{ns}/{name}"} if target != name else {})}
    if env:
        runtime_env = dict(app.get("runtime_env") or {})
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env}
        app["runtime_env"] = runtime_env
    return app


def app_owner(app: dict) -> tuple[str, str] | None:
    """(namespace, job) an app serves for: the recorded owner, else the job its route names."""
    env = ((app.get("deployed_app_config") or {}).get("runtime_env") or {}).get("env_vars") or {}
    ns, _, name = str(env.get(SERVED_BY_ENV, "")).partition("/")
    return (ns, name) if ns and name else job_of_route(app.get("route_prefix") or "")


def deploy_config(details: dict, put: list[dict] = (), remove: set[str] = frozenset()) -> dict:
    """The whole Serve deploy config: the deployed apps, `put` added/replaced, `remove` left out.

    `details` is GET /api/serve/applications/. Serve's HTTP options cannot change while it runs,
    so a running Serve keeps its own; otherwise Serve starts on 0.0.0.0:8000 like a RayService.
    """
    apps = details.get("applications") or {}
    keep = []
    for app_name_, app in apps.items():
        if app_name_ in remove or any(p["name"] == app_name_ for p in put):
            continue
        config = app.get("deployed_app_config")
        if config is None and app.get("status") == "DELETING":
            continue  # Serve clears a deleted app's config while it drains: it is leaving the config anyway
        if config is None:
            raise RayBackendError(
                f"Serve application {app_name_!r} on this Ray cluster was deployed with serve.run(); the Serve REST "
                f"API (which the operator uses) replaces all applications at once and cannot keep it: deploy it "
                f"with `serve deploy`, or point spec.ray.address at another cluster")
        keep.append(config)
    http = details.get("http_options") or {}
    return {
        "proxy_location": details.get("proxy_location") or "EveryNode",
        "http_options": {"host": http.get("host") or "0.0.0.0", "port": http.get("port") or 8000},
        "applications": keep + list(put),
    }


# --------------------------------------------------------------------------------------------
# Observe
# --------------------------------------------------------------------------------------------


def _rfc3339_ms(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def failure_message(details: dict, logs: str, address: str = "RAY_ADDRESS") -> str:
    """Why a Ray job failed, redacted (error class + Ray's message head; see failures.py)."""
    full_log = f"ray job logs {details.get('submission_id') or '?'} --address {address}"
    return redacted_failure(details.get("message") or "", logs, full_log)


def stage_run(details: dict, logs: str = "", address: str = "RAY_ADDRESS") -> StageRun | None:
    """A Ray job (JobDetails as a dict) as the planner sees it; None when it is not a stage run."""
    meta = details.get("metadata") or {}
    try:
        stage, attempt = meta[META_STAGE], int(meta[META_ATTEMPT])
    except (KeyError, ValueError):
        return None
    status = str(details.get("status") or "").rsplit(".", 1)[-1].upper()
    state = {"PENDING": "Pending", "RUNNING": "Running", "SUCCEEDED": "Succeeded", "FAILED": "Failed",
             "STOPPED": "Deleting"}.get(status, "Pending")
    reason = message = ""
    if state == "Failed":
        reason = details.get("error_type") or "JobFailed"
        message = failure_message(details, logs, address)
    elif state == "Pending":
        message = details.get("message") or ""
    return StageRun(stage=stage, attempt=attempt, name=details.get("submission_id") or "", state=state,
                    reason=reason, message=message, start_time=_rfc3339_ms(details.get("start_time")),
                    end_time=_rfc3339_ms(details.get("end_time")))


def serving_app(name: str, app: dict) -> ServingApp:
    """A Serve application (GET /api/serve/applications/ entry) as the planner sees it."""
    config = app.get("deployed_app_config") or {}
    status = app.get("status", "")
    owner = app_owner(app)
    return ServingApp(name=name, model_uri=(config.get("args") or {}).get("model_source", ""),
                      ready=status == "RUNNING", message=app.get("message", ""), deleting=status == "DELETING",
                      owner="/".join(owner) if owner else "")
