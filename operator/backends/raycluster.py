"""The Ray-cluster backend: stages through the Ray Jobs API, the serving app through Serve's REST
API, on an existing Ray cluster the platform team listed (ray_clusters.py: spec.ray.cluster, a
listed spec.ray.address, else the operator's default cluster).

`RayCluster` is the thin client (one per listed cluster: it holds its token, a Serve lock and a
log cache; the token goes only to that cluster's address, as a bearer header);
`RayClusterBackend` is the backends.Backend a job on that cluster gets. What is sent and how it is
read back are plain functions in raycluster_objects.py.

Nothing on a Ray cluster carries owner references, so deletion is observed, not delegated:
`collect_garbage` (run by the periodic resync, and on a job's DELETED event) stops the Ray jobs
and removes the Serve apps whose MedDistillJob is gone or was re-created.

Serve's REST API is declarative over *all* applications (a PUT replaces the whole set), so every
change reads the deployed configs, changes only our app and writes the set back, under one lock.
There are no pods to mount the job's Secrets in, so the operator reads them and passes their values
in the runtime_env (never logged): only Secrets their owner labelled `meddistill.io/inject: "true"`,
listed by that label so an unlabelled Secret never leaves the API server. Imports ray's job client
lazily and never torch.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

from kubernetes.client.exceptions import ApiException

from meddistill.spec.models import MedDistillJob

from .. import kube_api, metrics
from ..failures import CHILD_CONFLICT, ReconcileBlocked
from ..planner import Observed, Plan, Serve, ServingApp, ServingTarget, StageRun, StartStage
from .ray_clusters import AllowedCluster
from .raycluster_objects import (
    APP_PREFIX,
    META_JOB,
    META_UID,
    RayBackendError,
    SecretUnavailable,
    app_name,
    app_owner,
    dashboard_address,
    deploy_config,
    route_prefix,
    secret_env,
    secret_refs,
    serve_application,
    served_job,
    serving_app,
    stage_run,
    submission,
    submission_id,
)

log = logging.getLogger("meddistill.operator")
TOKEN_REFRESH_S = 60.0  # how often a listed cluster's token Secret is read again (rotation without a restart)
INJECT_LABEL = "meddistill.io/inject"  # a Secret's owner consents to the operator passing it to a Ray cluster
SERVE_API = "/api/serve/applications/"
STOP_WAIT_SECONDS = 15.0
FAILURE_MESSAGE_CHARS = 1500


@dataclass
class Snapshot:
    """Our Ray jobs and Serve apps, read before the live jobs are listed (see collect_garbage)."""

    runs: list[dict]
    apps: dict[str, dict]



# Ray's JobSubmissionClient replaces the address it is given with $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS
# when either is set ("always overridden", ray.dashboard.utils.get_address_for_submission_client): an
# operator (or a test process) with RAY_ADDRESS in its environment would send a listed cluster's token to
# whatever that names. The address is resolved once, in the constructor, so they are hidden while it runs.
_ENV_ADDRESSES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
_env_lock = threading.Lock()


class _address_from_environment_ignored:
    def __enter__(self):
        _env_lock.acquire()
        self.saved = {k: os.environ.pop(k) for k in _ENV_ADDRESSES if k in os.environ}

    def __exit__(self, *exc):
        os.environ.update(self.saved)
        _env_lock.release()

class RayCluster:
    """One Ray cluster's Jobs API and Serve REST API."""

    def __init__(self, allowed: AllowedCluster, token: str | None = None):
        self.allowed, self.address, self._token = allowed, dashboard_address(allowed.address), token
        self._token_from_secret, self._token_read_at = token is None and allowed.token_secret is not None, 0.0
        self._client = self._serve = None
        self._serve_lock = threading.Lock()  # read-modify-write of the whole Serve config
        self._failure_logs: dict[str, str] = {}  # a failed job's logs never change

    def headers(self) -> dict[str, str]:
        """The bearer token for this cluster only, read when first needed (its Secret may come later) and
        again every TOKEN_REFRESH_S, so a rotated token takes effect without restarting the operator (the
        clients, built with the old header, are rebuilt).

        An explicit Authorization header also keeps ray from adding a token of the operator's environment."""
        if self._token_from_secret and (self._token is None or time.monotonic() - self._token_read_at > TOKEN_REFRESH_S):
            token = _read_token(self.allowed)
            if token != self._token:
                if self._token is not None:
                    log.info("Ray cluster %s: its token Secret changed; using the new token", self.allowed.name)
                self._client = self._serve = None
            self._token, self._token_read_at = token, time.monotonic()
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    # ---- Jobs API ----------------------------------------------------------------------------

    def client(self):
        self.headers()  # a rotated token drops the client built with the old one
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            headers = self.headers()
            try:
                with _address_from_environment_ignored():
                    self._client = JobSubmissionClient(self.address, headers=headers)
            except Exception as e:  # noqa: BLE001 - connection, HTTP and ray's AuthenticationError alike
                raise RayBackendError(f"Ray cluster {self.allowed.name!r} ({self.address}, spec.ray): the Ray Jobs API "
                                      f"does not answer ({e}); check that its dashboard runs and, with token auth, "
                                      f"its tokenSecret in the operator's rayClusters") from None
        return self._client

    def jobs(self) -> list[dict]:
        """Every Ray job of ours on the cluster (any MedDistillJob), as plain dicts."""
        try:
            listed = self.client().list_jobs()
        except RayBackendError:
            raise
        except Exception as e:  # noqa: BLE001 - connection, HTTP and auth errors alike
            raise RayBackendError(f"GET {self.address}/api/jobs/: {e}; check spec.ray.address and that the "
                                  f"Ray dashboard runs on the head") from None
        out = []
        for d in listed:
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
        """Submit one stage attempt; False when this job submitted it already (a restart found it)."""
        kwargs = submission(job, uid, start, env)
        sid = kwargs["submission_id"]
        try:
            self.client().submit_job(**kwargs)
        except RuntimeError as e:
            if "already exists" not in str(e):
                raise RayBackendError(f"submitting {sid} to {self.address}: {e}") from None
            owner = (self.client().get_job_info(sid).metadata or {}).get(META_UID)
            if owner != uid:  # not ours: another job (or a same-named one deleted earlier) holds the id
                raise ReconcileBlocked(
                    f"Ray job {sid} on {self.address} exists and belongs to another MedDistillJob (uid {owner}), not "
                    f"this one: stop and delete it (ray job stop/delete {sid}) or rename this job", CHILD_CONFLICT) from None
            return False
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
        self.headers()  # a rotated token drops the client built with the old one
        if self._serve is None:
            # The client `serve deploy` uses: same REST API, same auth headers as the Jobs client.
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            headers = self.headers()
            try:
                self._serve = ServeSubmissionClient(self.address, headers=headers)
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
            owner = app_owner(app)  # serving.replaces moves it: deleting the replaced job keeps the app
            if owner is None or (namespace and owner[0] != namespace):
                continue
            if owner not in live:
                orphans.add(n)
        if orphans:
            self.remove_apps(orphans)
            removed += sorted(orphans)
        return removed


_clusters: dict[AllowedCluster, RayCluster] = {}
_clusters_guard = threading.Lock()


def cluster(allowed: AllowedCluster) -> RayCluster:
    """One RayCluster per listed cluster for the operator's lifetime (it keeps a Serve lock and a log cache)."""
    with _clusters_guard:
        if allowed not in _clusters:
            _clusters[allowed] = RayCluster(allowed)
        return _clusters[allowed]


def _read_token(allowed: AllowedCluster) -> str | None:
    """The cluster's token from its Secret in the operator's namespace (the platform team's, never a job's)."""
    ref = allowed.token_secret
    if ref is None:
        return None
    where = f"Secret {ref.namespace}/{ref.name} key {ref.key!r} (tokenSecret of Ray cluster {allowed.name!r})"
    try:
        data = kube_api.core().read_namespaced_secret(ref.name, ref.namespace).data or {}
    except ApiException as e:
        raise RayBackendError(f"{where}: HTTP {e.status} {e.reason}; create it, and let the operator get it "
                              f"(the chart's Role for rayClusters token Secrets)") from None
    if not data.get(ref.key):
        raise RayBackendError(f"{where} is empty or missing; put the cluster's token there")
    return base64.b64decode(data[ref.key]).decode().strip()


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


def _read_secret(namespace: str, name: str, field: str) -> dict[str, str]:
    """A Secret its owner consented to pass on (INJECT_LABEL); listed by that label, so no other is ever read."""
    try:
        found = kube_api.core().list_namespaced_secret(
            namespace, label_selector=f"{INJECT_LABEL}=true", field_selector=f"metadata.name={name}").items
    except ApiException as e:
        if e.status == 403:
            raise SecretUnavailable(
                f"the operator may not list Secrets in namespace {namespace}, which {field} of a job on a Ray cluster "
                f"needs: add {namespace} to the chart's ray.secretNamespaces") from None
        raise
    if not found:
        raise SecretUnavailable(
            f"Secret {namespace}/{name} (named by {field}) does not exist or is not labelled {INJECT_LABEL}=\"true\": "
            f"the operator passes a Secret to a Ray cluster only with its owner's consent; create it in the job's "
            f"namespace and label it: kubectl -n {namespace} label secret {name} {INJECT_LABEL}=true")
    return {k: base64.b64decode(v).decode() for k, v in (found[0].data or {}).items()}


def job_secret_env(job: MedDistillJob, serving: bool, cluster: AllowedCluster) -> dict[str, str]:
    """What the job's Secrets give a stage (or the Serve app) on a Ray cluster; values never logged.

    Values (artifacts.secretName) go only to a cluster listed for the job's namespace alone: Ray returns
    every job's and app's runtime_env to every holder of the cluster's token. The serving token goes as
    its digest (raycluster_objects.secret_env), wherever the job runs."""
    refs = secret_refs(job, serving)
    if job.spec.artifacts.secret_name and not cluster.single_tenant:
        ns = job.metadata.namespace
        raise SecretUnavailable(
            f"spec.artifacts.secretName: Ray cluster {cluster.name!r} is shared ({cluster.tenants()}), and Ray shows "
            f"each job's environment to every holder of its token, so the operator sends no Secret values there. "
            f"Give the cluster's nodes their own storage credentials and drop spec.artifacts.secretName, or run on a "
            f"cluster listed for namespace {ns} alone (the chart's rayClusters[].namespaces: [{ns}])")
    secrets = {name: _read_secret(job.metadata.namespace, name, field) for field, name in refs.items()}
    return secret_env(job, secrets, serving)


class RayClusterBackend:
    """backends.Backend for the jobs that run on one Ray cluster."""

    def __init__(self, ray: RayCluster):
        self.ray = ray

    def observe(self, job: MedDistillJob, uid: str) -> Observed:
        ns, name = job.metadata.namespace, job.metadata.name
        # serving.replaces: the app this job takes over is observed as its own (its owner says whose it is).
        # local_paths="shared": an absolute artifacts path works where every node and the operator mount it;
        # a relative one (`./runs`) resolves in each process's own working directory and is refused.
        return Observed(runs=tuple(self.ray.runs(ns, name, uid)), serving=self.ray.serving(ns, served_job(job)),
                        moves_serving=True, local_paths="shared")

    def endpoint(self, job: MedDistillJob) -> ServingTarget:
        ns, target = job.metadata.namespace, served_job(job)
        return ServingTarget(name=app_name(ns, target), endpoint=self.ray.endpoint(ns, target))

    def apply(self, job: MedDistillJob, uid: str, p: Plan) -> None:
        ray, ns, name = self.ray, job.metadata.namespace, job.metadata.name
        for item in p.create:
            if isinstance(item, StartStage):
                if ray.submit(job, uid, item, job_secret_env(job, serving=False, cluster=ray.allowed)):
                    metrics.CHILDREN_CREATED.labels("rayjobs-api").inc()
                    log.info("submitted Ray job %s to %s", submission_id(ns, name, item.stage, item.attempt), ray.address)
            else:
                ray.deploy(job, item, job_secret_env(job, serving=True, cluster=ray.allowed))
                metrics.CHILDREN_CREATED.labels("serve-apps").inc()
                log.info("deployed Serve app %s on %s", app_name(ns, name), ray.address)
        for item in p.update:
            ray.deploy(job, item, job_secret_env(job, serving=True, cluster=ray.allowed))
            log.info("updated Serve app %s to model %s", app_name(ns, name), item.model_uri)
        for item in p.delete:
            if item.kind == "stage":
                ray.stop_and_delete(item.name)
            else:
                ray.remove_apps({item.name})
            log.info("removed %s %s from %s", "Ray job" if item.kind == "stage" else "Serve app", item.name, ray.address)

    def collect_garbage(self, list_live: Callable[[], dict[tuple[str, str], str]], namespace: str | None) -> list[str]:
        snapshot = self.ray.snapshot()  # first: see RayCluster.collect_garbage for why
        return [f"{what} from {self.ray.address}" for what in self.ray.collect_garbage(snapshot, list_live(), namespace)]
