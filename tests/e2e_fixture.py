"""Pytest plugin: the whole MedDistill path on a real Ray cluster, once per session.

    pytest_plugins = ["tests.support.kube_fixtures", "tests.e2e_fixture"]

Fixtures
  ray_head        a real local Ray head (`ray start --head --block`, token auth, private ports and
                  temp dir) with Serve on a free port; stopped at the end of the session
  ray_operator    `meddistill operator` as a real process with the chart's RBAC (ServiceAccount
                  kubeconfig) against the real kube-apiserver, with the Ray token in its env
  quickstart_e2e  `kubectl apply` of examples/quickstart.yaml pointed at `ray_head` (spec.ray.address)
                  with an absolute artifacts.uri and serving.auth from a Secret; waits until the job
                  reads Serving. Returns an
                  E2ERun: artifact_root (<tmp>/runs/quickstart, the same layout `meddistill run`
                  writes), the final status, the endpoint, wall time. ~10-20 minutes on 2 cores.

The Ray head is not stopped with `ray stop`: that kills every Ray process of the user on the machine
(other test sessions' clusters included); its own process group is terminated instead.
Set MEDDISTILL_KEEP_RAY_TMP=1 to keep the head's temp dir (Ray's session logs) for debugging.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.kube_cluster import OPERATOR_NAMESPACE, REPO_ROOT, free_port
from tests.test_operator_kube import Kube, OperatorProcess, install_operator_prereqs, quickstart

PIPELINE_TIMEOUT_S = 50 * 60  # the whole quickstart (~20 min alone on 2 cores; CI runs it beside the rest of the suite)


class RayHead:
    """A real single-node Ray cluster in its own process group, ports and temp dir."""

    def __init__(self, workdir: Path, num_cpus: int = 2):
        self.workdir, self.num_cpus = workdir, num_cpus
        self.token = secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None
        # Unix socket paths must stay short: pytest's tmp paths are too long for Ray's sockets.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="mdray-", dir="/tmp"))
        self.dashboard_port = self.gcs_port = self.serve_port = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Environment of every Ray client of this cluster (the operator included)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self, timeout: float = 240) -> "RayHead":
        self.dashboard_port, self.gcs_port, self.serve_port = free_port(), free_port(), free_port()
        ports = {  # every default port may be taken by another Ray on a shared machine
            "--port": self.gcs_port, "--dashboard-port": self.dashboard_port,
            "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(), "--ray-client-server-port": free_port(),
            "--runtime-env-agent-port": free_port(), "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        argv = ["ray", "start", "--head", "--block", f"--num-cpus={self.num_cpus}", "--dashboard-host=127.0.0.1",
                f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                *[f"{flag}={port}" for flag, port in ports.items()]]
        log = open(self.workdir / "ray-head.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._job_agent_ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not start; log:\n{self.log()[-3000:]}")
            time.sleep(1)
        # Serve on a free port (the operator keeps a running Serve's HTTP options; default is 8000).
        subprocess.run(["serve", "start", f"--address=127.0.0.1:{self.gcs_port}", "--http-host=127.0.0.1",
                        f"--http-port={self.serve_port}"], env=self.env(), cwd=self.workdir, check=True,
                       capture_output=True, timeout=timeout)
        return self

    def _job_agent_ready(self) -> bool:
        # Submissions fail with "No available agent" until the head's agent registered.
        try:
            return bool(self.get("/api/v0/nodes?view=summary")) and self.get("/api/jobs/") is not None
        except (OSError, ValueError):
            return False

    def get(self, path: str):
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read().decode() or "null")

    def serve_apps(self) -> dict:
        return self.get("/api/serve/applications/").get("applications") or {}

    def jobs(self) -> list[dict]:
        return self.get("/api/jobs/")

    def log(self) -> str:
        path = self.workdir / "ray-head.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # whatever Ray left in the group (the SIGTERM drain can outlive `ray start`)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
        if not os.environ.get("MEDDISTILL_KEEP_RAY_TMP"):  # session logs, spilled objects: large
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextmanager
def _environ(extra: dict[str, str]):
    """Set env vars while a child process is started (it copies os.environ), then restore them."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@dataclass
class E2ERun:
    artifact_root: Path  # <tmp>/runs/quickstart: the stage dirs, as `meddistill run` lays them out
    status: dict  # the MedDistillJob's status once it read Serving
    endpoint: str  # the OpenAI base URL from status.serving
    model_name: str
    wall_s: float  # kubectl apply -> phase Serving
    kube: Kube
    ray: RayHead
    operator: OperatorProcess
    name: str = "quickstart"
    token: str = ""  # the endpoint's bearer token (spec.serving.auth's Secret)


def wait_for_phase(kube: Kube, name: str, phases: set[str], timeout: float, ray: RayHead | None = None) -> dict:
    """Poll the job until its phase is one of `phases`; a Failed job ends the wait with its message."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = kube.job(name).get("status") or {}
        if status.get("phase") in phases:
            return status
        if status.get("phase") == "Failed" and "Failed" not in phases:
            failed = next((c["message"] for c in status.get("conditions", []) if c["type"] == "Failed"), "")
            raise AssertionError(f"{name} failed: {failed}\nstatus: {json.dumps(status)[:3000]}")
        if status != last:
            print(f"[e2e] {name}: {status.get('phase')} {status.get('currentStage')}", file=sys.stderr, flush=True)
            last = status
        time.sleep(2)
    extra = f"\nray jobs: {[(j['submission_id'], j['status']) for j in ray.jobs()]}" if ray else ""
    raise AssertionError(f"{name}: no phase in {phases} after {timeout}s; status: {json.dumps(last)[:3000]}{extra}")


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("ray-head")).start()
    yield head
    head.stop()


RAY_CLUSTER = "local-head"  # what jobs name in spec.ray.cluster
# The namespace of this session's e2e jobs, the only one the head is listed for: a cluster of one tenant is
# where the operator passes Secret values on (ray_clusters.py), which test_e2e_ray's stage-env test needs.
E2E_NAMESPACE = f"e2e-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def ray_operator(kube_cluster, ray_head, tmp_path_factory):
    # The platform team lists the head (plain http on loopback: allowInsecure) with its token Secret in the
    # operator's namespace; jobs in any namespace may pass on their labelled Secrets (secretsClusterWide).
    cluster = {"name": RAY_CLUSTER, "address": ray_head.address, "tokenSecret": {"name": "ray-token"}, "allowInsecure": True,
               "namespaces": [E2E_NAMESPACE]}
    install_operator_prereqs(kube_cluster, values=[f"rayClusters[0].{k}={v}" for k, v in cluster.items()
                                                   if k not in ("tokenSecret", "namespaces")]
                             + [f"rayClusters[0].namespaces={{{E2E_NAMESPACE}}}"]
                             + ["rayClusters[0].tokenSecret.name=ray-token", "ray.secretsClusterWide=true"])
    kube_cluster.kubectl("-n", OPERATOR_NAMESPACE, "create", "secret", "generic", "ray-token",
                         f"--from-literal=token={ray_head.token}", check=False)
    work = tmp_path_factory.mktemp("ray-operator")
    (work / "ray-clusters.yaml").write_text(yaml.safe_dump({"clusters": [cluster]}))
    op = OperatorProcess(kube_cluster, work / "operator.log", args=("--ray-clusters", str(work / "ray-clusters.yaml")))
    with _environ({"MEDDISTILL_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE}):
        op.start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def e2e_namespace(kube_cluster, ray_operator):
    ns = E2E_NAMESPACE
    kube_cluster.kubectl("create", "namespace", ns)
    yield Kube(kube_cluster, ns)
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="session")
def quickstart_e2e(e2e_namespace, ray_head, ray_operator, tmp_path_factory) -> E2ERun:
    kube, name = e2e_namespace, "quickstart"
    runs = tmp_path_factory.mktemp("e2e") / "runs"  # absolute: the stages run in Ray's own working dir
    started = time.monotonic()
    # serving.auth on: the operator hands the Secret's token to the Serve app (no pod env on a Ray cluster).
    token = secrets.token_urlsafe(24)
    kube.cluster.kubectl("-n", kube.ns, "create", "secret", "generic", "quickstart-serve-token", f"--from-literal=token={token}")
    kube.cluster.kubectl("-n", kube.ns, "label", "secret", "quickstart-serve-token", "meddistill.io/inject=true")
    doc = quickstart(name, str(runs), ray={"cluster": RAY_CLUSTER})
    doc["spec"]["serving"]["auth"] = {"secretName": "quickstart-serve-token"}
    kube.apply(doc)
    status = wait_for_phase(kube, name, {"Serving"}, PIPELINE_TIMEOUT_S, ray_head)
    wall = time.monotonic() - started
    print(f"[e2e] quickstart on Ray: apply -> Serving in {wall:.0f}s", file=sys.stderr, flush=True)
    return E2ERun(artifact_root=runs / kube.job_dir(name), status=status, endpoint=status["serving"]["endpoint"],
                  model_name=status["serving"]["modelName"], wall_s=wall, kube=kube, ray=ray_head,
                  operator=ray_operator, name=name, token=token)


__all__ = ["E2ERun", "RayHead", "REPO_ROOT", "wait_for_phase"]
