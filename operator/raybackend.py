"""The Ray cluster backend: stage runs as Ray Jobs API submissions, the serving app as a Ray Serve
application, both on an existing Ray cluster (spec.ray.address, else the operator's --ray-address).

Like kuberay.py, the render and observe halves are plain functions of plain data (tested without a
cluster); `RayCluster` is the thin client side (Jobs API client + Serve REST API) the handlers call.
The same planner drives both backends: it only sees StageRun / ServingApp.

Names (deterministic, so a restarted operator finds what it started instead of duplicating it):
- submission id `<namespace>-<job>-<stage>-a<attempt>`, job metadata
  `{meddistill.io/job: <ns>/<name>, meddistill.io/uid, meddistill.io/stage, meddistill.io/attempt}`;
- Serve app `mdj-<namespace>-<job>` at route prefix `/<namespace>/<job>`, so the endpoint is
  `http://<ray host>:<serve port>/<namespace>/<job>/v1`.

A Ray job that is STOPPED counts as a deleted child (a suspension or a deletion stopped it): the
planner waits for it to be gone and then re-creates the same attempt, as with a deleted RayJob.
Nothing on a Ray cluster carries owner references, so deletion is observed, not delegated:
`RayCluster.collect_garbage` (run by the periodic resync, and for one job on its DELETED event)
stops the Ray jobs and removes the Serve apps whose MedDistillJob is gone or was re-created.

Serve's REST API is declarative over *all* applications (a PUT replaces the whole set), so every
change reads the deployed configs, changes only our app and writes the set back, under one lock.
Imports ray's job client lazily and never torch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlparse

import yaml

from meddistill.serve.config import TOKEN_ENV, render_serve_config_v2
from meddistill.spec.models import MedDistillJob

from .failures import redacted_failure
from .kuberay import job_document
from .planner import Serve, ServingApp, StageRun, StartStage
from .sizing import entrypoint_resources

META_JOB, META_UID = "meddistill.io/job", "meddistill.io/uid"
META_STAGE, META_ATTEMPT = "meddistill.io/stage", "meddistill.io/attempt"
APP_PREFIX = "mdj-"
SERVE_API = "/api/serve/applications/"
STOP_WAIT_SECONDS = 15.0
FAILURE_MESSAGE_CHARS = 1500


class RayBackendError(RuntimeError):
    """The Ray cluster refused or cannot do what the plan asks (the message says how to fix it)."""


class SecretUnavailable(RayBackendError):
    """A Secret the job names is missing, unreadable or lacks its key (the message names field and fix)."""


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def submission_id(namespace: str, job: str, stage: str, attempt: int) -> str:
    return f"{namespace}-{job}-{stage}-a{attempt}"


def app_name(namespace: str, job: str) -> str:
    return f"{APP_PREFIX}{namespace}-{job}"


def route_prefix(namespace: str, job: str) -> str:
    # The route holds namespace and name unambiguously (names have no '/'): the garbage
    # collector reads the owning job back from it.
    return f"/{namespace}/{job}"


def job_of_route(route: str) -> tuple[str, str] | None:
    parts = route.strip("/").split("/")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def dashboard_address(address: str) -> str:
    """The Jobs/Serve REST address; `ray://` (Ray Client) has neither, so it is refused clearly."""
    if not address.startswith(("http://", "https://")):
        raise RayBackendError(
            f"spec.ray.address {address!r}: the operator talks to the Ray dashboard (Jobs API and Serve REST "
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
    artifacts.secretName (envFrom), and for serving the bearer token under $MEDDISTILL_SERVE_TOKEN.
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
        env[TOKEN_ENV] = data[auth.key].strip()
    return env


def submission(job: MedDistillJob, uid: str, start: StartStage, env: dict[str, str] | None = None) -> dict:
    """Keyword arguments of `JobSubmissionClient.submit_job` for one stage attempt (env: secret_env)."""
    ns, name = job.metadata.namespace or "default", job.metadata.name
    driver = entrypoint_resources(job, start.stage)  # the same numbers the KubeRay RayJob gets
    return {
        # The same entrypoint and job document the KubeRay RayJob gets (and `meddistill run` calls).
        "entrypoint": f"python -m meddistill.jobs {start.stage}",
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
    ns, name = job.metadata.namespace or "default", job.metadata.name
    app = yaml.safe_load(render_serve_config_v2(job, serve.model_uri))["applications"][0]
    app = {**app, "name": app_name(ns, name), "route_prefix": route_prefix(ns, name)}
    if env:
        runtime_env = dict(app.get("runtime_env") or {})
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env}
        app["runtime_env"] = runtime_env
    return app


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
    return ServingApp(name=name, model_uri=(config.get("args") or {}).get("model_source", ""),
                      ready=status == "RUNNING", message=app.get("message", ""), deleting=status == "DELETING")


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Our Ray jobs and Serve apps, read before the live jobs are listed (see collect_garbage)."""

    runs: list[dict]
    apps: dict[str, dict]


class RayCluster:
    """One Ray cluster's Jobs API and Serve REST API."""

    def __init__(self, address: str):
        self.address = dashboard_address(address)
        self._client = self._serve = None
        self._serve_lock = threading.Lock()  # read-modify-write of the whole Serve config
        self._failure_logs: dict[str, str] = {}  # a failed job's logs never change

    # ---- Jobs API ----------------------------------------------------------------------------

    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as e:  # noqa: BLE001 - connection, HTTP and ray's AuthenticationError alike
                raise RayBackendError(f"spec.ray.address {self.address}: the Ray Jobs API does not answer ({e}); "
                                      f"check the address, that the dashboard runs on the head and, with token "
                                      f"auth, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in the operator") from None
        return self._client

    def jobs(self) -> list[dict]:
        """Every Ray job of ours on the cluster (any MedDistillJob), as plain dicts."""
        out = []
        for d in self.client().list_jobs():
            d = d.dict() if hasattr(d, "dict") else dict(d)
            if META_JOB in (d.get("metadata") or {}):
                out.append(d)
        return out

    def runs(self, namespace: str, name: str, uid: str) -> list[StageRun]:
        runs = []
        for d in self.jobs():
            meta = d["metadata"]
            # uid: a re-created job with the same name must not adopt the old job's runs.
            if meta[META_JOB] != f"{namespace}/{name}" or meta.get(META_UID) != uid:
                continue
            run = stage_run(d, self._logs_if_failed(d), self.address)
            if run is not None:
                runs.append(run)
        return runs

    def _logs_if_failed(self, d: dict) -> str:
        if str(d.get("status") or "").rsplit(".", 1)[-1].upper() != "FAILED":
            return ""
        sid = d["submission_id"]
        if sid not in self._failure_logs:
            try:
                self._failure_logs[sid] = self.client().get_job_logs(sid)
            except Exception as e:  # noqa: BLE001 - the failure is reported either way
                return f"(logs unavailable: {e})"
        return self._failure_logs[sid]

    def submit(self, job: MedDistillJob, uid: str, start: StartStage, env: dict[str, str] | None = None) -> bool:
        """Submit one stage attempt; False when it exists already (a restart found it)."""
        kwargs = submission(job, uid, start, env)
        try:
            self.client().submit_job(**kwargs)
        except RuntimeError as e:
            if "already exists" in str(e):
                return False
            raise RayBackendError(f"submitting {kwargs['submission_id']} to {self.address}: {e}") from None
        return True

    def stop_and_delete(self, sid: str) -> None:
        """Stop a Ray job and drop its record, so the submission id is free again."""
        client = self.client()
        try:
            client.stop_job(sid)
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            while str(client.get_job_status(sid)).rsplit(".", 1)[-1].upper() not in ("STOPPED", "SUCCEEDED", "FAILED"):
                if time.monotonic() > deadline:
                    return  # still stopping: the next garbage collection deletes the record
                time.sleep(0.5)
            client.delete_job(sid)
        except RuntimeError as e:
            if "does not exist" not in str(e):  # gone already (a concurrent collection): done
                raise RayBackendError(f"stopping Ray job {sid} on {self.address}: {e}") from None
        self._failure_logs.pop(sid, None)

    # ---- Serve REST API ----------------------------------------------------------------------

    def serve_client(self):
        if self._serve is None:
            # The client `serve deploy` uses: same REST API, same auth headers as the Jobs client.
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            try:
                self._serve = ServeSubmissionClient(self.address)
            except Exception as e:  # noqa: BLE001 - connection, HTTP and auth errors alike
                raise RayBackendError(f"{self.address}{SERVE_API}: {e}; is the Ray dashboard up?") from None
        return self._serve

    def serve_details(self) -> dict:
        try:
            return self.serve_client().get_serve_details()
        except Exception as e:  # noqa: BLE001 - connection, HTTP and auth errors alike
            raise RayBackendError(f"GET {self.address}{SERVE_API}: {e}") from None

    def _put_serve_config(self, config: dict) -> None:
        try:
            self.serve_client().deploy_applications(config)
        except Exception as e:  # noqa: BLE001 - connection, HTTP and auth errors alike
            raise RayBackendError(f"PUT {self.address}{SERVE_API}: {str(e)[-FAILURE_MESSAGE_CHARS:]}") from None

    def serving(self, namespace: str, name: str) -> ServingApp | None:
        apps = self.serve_details().get("applications") or {}
        app = apps.get(app_name(namespace, name))
        return serving_app(app_name(namespace, name), app) if app else None

    def deploy(self, job: MedDistillJob, serve: Serve, env: dict[str, str] | None = None) -> None:
        """Create our app, or point it at a new model in place (other apps are left as they are)."""
        with self._serve_lock:
            self._put_serve_config(deploy_config(self.serve_details(), put=[serve_application(job, serve, env)]))

    def remove_apps(self, names: set[str]) -> None:
        with self._serve_lock:
            details = self.serve_details()
            present = {n for n, a in (details.get("applications") or {}).items() if a.get("status") != "DELETING"}
            if names & present:  # an app already being deleted needs no second PUT
                self._put_serve_config(deploy_config(details, remove=names))

    def endpoint(self, namespace: str, name: str) -> str:
        """The OpenAI base URL of a job's app: Serve's own port on the dashboard's host."""
        port = (self.serve_details().get("http_options") or {}).get("port") or 8000
        return f"http://{urlparse(self.address).hostname}:{port}{route_prefix(namespace, name)}/v1"

    # ---- Garbage collection -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        apps = {n: a for n, a in (self.serve_details().get("applications") or {}).items() if n.startswith(APP_PREFIX)}
        return Snapshot(runs=self.jobs(), apps=apps)

    def collect_garbage(self, snapshot: Snapshot, live: dict[tuple[str, str], str], namespace: str | None) -> list[str]:
        """Remove what no live MedDistillJob owns; `live` maps (ns, name) to uid, listed AFTER the snapshot.

        That order matters: a run submitted after the snapshot is not in it, and a job created
        after the listing cannot own anything in the (earlier) snapshot, so nothing live is removed.
        Also drops the records of STOPPED runs (a stop means 'deleted'; the planner re-creates them).
        Returns what it removed.
        """
        removed = []
        for d in snapshot.runs:
            meta = d["metadata"]
            ns, _, name = meta[META_JOB].partition("/")
            if namespace and ns != namespace:
                continue  # another operator's namespace: not ours to judge
            stopped = str(d.get("status") or "").rsplit(".", 1)[-1].upper() == "STOPPED"
            if live.get((ns, name)) != meta.get(META_UID) or stopped:
                self.stop_and_delete(d["submission_id"])
                removed.append(d["submission_id"])
        orphans = set()
        for n, app in snapshot.apps.items():
            owner = job_of_route(app.get("route_prefix") or "")
            if owner is None or (namespace and owner[0] != namespace):
                continue
            if owner not in live:
                orphans.add(n)
        if orphans:
            self.remove_apps(orphans)
            removed += sorted(orphans)
        return removed


_clusters: dict[str, RayCluster] = {}
_clusters_guard = threading.Lock()


def cluster(address: str) -> RayCluster:
    """One RayCluster per address for the operator's lifetime (it keeps a Serve lock and a log cache)."""
    key = dashboard_address(address)
    with _clusters_guard:
        if key not in _clusters:
            _clusters[key] = RayCluster(key)
        return _clusters[key]


def known_clusters() -> list[RayCluster]:
    with _clusters_guard:
        return list(_clusters.values())
