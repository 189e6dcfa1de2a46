"""The operator as a real process against a real kube-apiserver, with the chart's RBAC.

The test plays KubeRay: it patches each RayJob's /status the way KubeRay v1.7 does and writes each
stage's artifact (manifest.json, results.json) where the stage would. Everything else is real:
the apiserver validates (schema + CEL), RBAC authorizes the operator's ServiceAccount token,
kube-controller-manager's garbage collector deletes children of a deleted job.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from meddistill import artifacts
from meddistill.operator.backends.kuberay_objects import default_image
from meddistill.spec.models import NAME_MAX, MedDistillJob, MedDistillJobStatus, ObjectMeta, Results
from tests.support.kube_cluster import OPERATOR_NAMESPACE, REPO_ROOT, free_port

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube

CHART = REPO_ROOT / "charts" / "meddistill-operator"
CRD_FILE = CHART / "crds" / "meddistilljobs.yaml"
PEERING_CRDS_FILE = CHART / "crds" / "kopf-peerings.yaml"  # the chart's peering object needs them
STAGES = ["teacher", "distill-data", "distill", "quantize", "evaluate"]


# --------------------------------------------------------------------------------------------
# Helpers (also used by bench/operator_scale.py)
# --------------------------------------------------------------------------------------------


def wait_for(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def install_operator_prereqs(cluster, values: list[str] | None = None) -> str:
    """The generated CRD, the operator namespace and the chart's RBAC/Deployment (admin applies)."""
    install_crd(cluster)
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    # Without the gate-override admission policy: it is cluster-wide, and the tests' admin user writes
    # overrides in other people's names (tests/test_chart_gate_override_policy.py tests the policy).
    rendered = cluster.helm("template", "meddistill", str(CHART), "--namespace", OPERATOR_NAMESPACE,
                            "--set", "gateOverridePolicy.enabled=false",
                            *sum((["--set", v] for v in values or []), [])).stdout
    cluster.kubectl("apply", "-f", "-", input=rendered)
    return rendered


def install_crd(cluster) -> None:
    # Polls itself: `kubectl wait` right after creating a CRD can fail on its still-empty conditions.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=meddistill-tests", "-f", str(CRD_FILE),
                    "-f", str(PEERING_CRDS_FILE))

    def established() -> bool:
        for name in ("meddistilljobs.meddistill.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
            crd = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
            if not any(c["type"] == "Established" and c["status"] == "True" for c in crd.get("status", {}).get("conditions") or []):
                return False
        return True

    wait_for(established, 30, "the MedDistillJob and kopf peering CRDs to be Established")


class OperatorProcess:
    """`meddistill operator` in its own process, authenticated as the chart's ServiceAccount."""

    def __init__(self, cluster, log_path: Path, namespace: str | None = None, resync: float = 2.0, args: tuple = ()):
        self.cluster, self.log_path, self.namespace, self.resync, self.args = cluster, log_path, namespace, resync, args
        self.proc: subprocess.Popen | None = None
        self.metrics_port = self.health_port = 0

    def start(self) -> "OperatorProcess":
        self.metrics_port, self.health_port = free_port(), free_port()
        argv = [sys.executable, "-m", "meddistill.cli", "operator", "--kubeconfig", str(self.cluster.operator_kubeconfig),
                "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
                "--resync-seconds", str(self.resync)]
        if self.namespace:
            argv += ["--namespace", self.namespace]
        argv += list(self.args)
        # No PYTHONPATH=<repo>: the operator/ folder would shadow the standard library's `operator`.
        env = self.cluster.tool_env(self.cluster.operator_kubeconfig)
        env[artifacts.PVC_ROOT_ENV] = str(operator_pvc_root())  # pvc_store() mounts claims there
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        log.close()
        wait_for(self._healthy, 60, f"the operator's /healthz (log: {self.log_path})", interval=0.3)
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def resyncs(self) -> float:
        found = re.search(r"^meddistill_operator_resyncs_total (\S+)$", self.metrics(), re.M)
        return float(found.group(1)) if found else 0.0

    def wait_resyncs(self, passes: int = 2, timeout: float = 60) -> None:
        """Wait until `passes` full resync passes (every job reconciled) began after this call: proof
        that the operator looked again, where a sleep proves only that time went by."""
        start = self.resyncs()  # a pass under way may have seen the job before the event: hence start + passes
        wait_for(lambda: self.resyncs() >= start + passes, timeout, f"{passes} resync passes of the operator", interval=0.2)

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def quickstart(name: str, artifacts_uri: str, **spec_updates) -> dict:
    doc = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["artifacts"] = {"uri": artifacts_uri}
    doc["spec"].update(spec_updates)
    return doc


class Kube:
    """Admin-side reads and KubeRay impersonation."""

    def __init__(self, cluster, namespace: str):
        from kubernetes import client

        self.cluster, self.ns = cluster, namespace
        self.custom = client.CustomObjectsApi(cluster.api_client())
        self.core = client.CoreV1Api(cluster.api_client())

    def apply(self, doc: dict) -> None:
        self.cluster.kubectl("apply", "-n", self.ns, "-f", "-", input=yaml.safe_dump(doc))

    def job(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object("meddistill.io", "v1alpha1", self.ns, "meddistilljobs", name)

    def job_dir(self, name: str) -> str:
        """Where the operator's stages of this job write under artifacts.uri (namespace, name, uid)."""
        return artifacts.job_dir(ObjectMeta.model_validate(self.job(name)["metadata"]))

    def rayjobs(self, job: str) -> dict[str, dict]:
        items = self.custom.list_namespaced_custom_object("ray.io", "v1", self.ns, "rayjobs",
                                                          label_selector=f"meddistill.io/job={job}")["items"]
        return {o["metadata"]["name"]: o for o in items}

    def rayservices(self, job: str) -> list[dict]:
        return self.custom.list_namespaced_custom_object("ray.io", "v1", self.ns, "rayservices",
                                                         label_selector=f"meddistill.io/job={job}")["items"]

    def wait_rayjob(self, name: str, timeout: float = 20) -> dict:
        return wait_for(lambda: self._get_rayjob(name), timeout, f"RayJob {name}")

    def _get_rayjob(self, name: str):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object("ray.io", "v1", self.ns, "rayjobs", name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def kuberay_status(self, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status("ray.io", "v1", self.ns, "rayjobs", name, {"status": status})

    def kuberay_runs(self, name: str) -> None:
        self.kuberay_status(name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": f"{name}-id",
                                   "rayClusterName": f"{name}-raycluster", "startTime": now_rfc3339()})

    def kuberay_succeeds(self, name: str) -> None:
        self.kuberay_status(name, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "succeeded": 1,
                                   "endTime": now_rfc3339(), "message": "Job finished successfully."})

    def kuberay_fails(self, name: str, reason: str, message: str) -> None:
        self.kuberay_status(name, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "failed": 1,
                                   "reason": reason, "message": message, "endTime": now_rfc3339()})

    def events(self, name: str) -> list[str]:
        items = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [e.reason for e in items]


def write_stage_artifact(artifacts_uri: str, job_dir: str, stage: str) -> str:
    """What the stage entrypoint leaves behind: its files, then manifest.json last (job_dir: Kube.job_dir).

    A pvc:// store is written through the operator's mount of the job's namespace's claim (the same
    storage the pods write; job_dir starts with the namespace)."""
    d = artifacts.local_path(artifacts.stage_uri(artifacts_uri, job_dir, stage), namespace=job_dir.partition("/")[0])
    d.mkdir(parents=True, exist_ok=True)
    (d / "output.txt").write_text(f"{stage} output\n")
    if stage == "evaluate":
        results = Results.model_validate({
            "rows": [{"model": "teacher", "dataset": "pubmedqa", "accuracy": 0.6, "n": 40, "weightBytes": 538000000},
                     {"model": "quantized", "dataset": "pubmedqa", "accuracy": 0.525, "n": 40, "weightBytes": 90000000}],
            "memoryReductionPct": -83.3, "accuracyRetentionPct": 87.5,
        })
        (d / "results.json").write_text(json.dumps(results.model_dump(by_alias=True)))
    return artifacts.write_manifest(d, stage=stage, config={}).digest


def finish_stage(kube: Kube, artifacts_uri: str, job: str, stage: str, attempt: int = 1) -> str:
    name = f"{job}-{stage}-a{attempt}"
    kube.wait_rayjob(name)
    kube.kuberay_runs(name)
    digest = write_stage_artifact(artifacts_uri, kube.job_dir(job), stage)
    kube.kuberay_succeeds(name)
    return digest


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@functools.cache
def operator_pvc_root() -> Path:
    """Where the tests' operators find pvc:// claims: <root>/<namespace>/<claim>, as the chart's
    artifactClaims mount them ($MEDDISTILL_PVC_ROOT of every OperatorProcess)."""
    root = Path(tempfile.mkdtemp(prefix="meddistill-pvc-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@contextmanager
def pvc_root_env():
    """This process resolves pvc:// as the operators do (in-process reconciles, the tests' artifact writes).

    KubeRay pods do not share a local path, so the operator refuses one (ArtifactStoreNotShared);
    the tests play the pods by writing where the operator's mount of their claim is."""
    old = os.environ.get(artifacts.PVC_ROOT_ENV)
    os.environ[artifacts.PVC_ROOT_ENV] = str(operator_pvc_root())
    try:
        yield operator_pvc_root()
    finally:
        if old is None:
            del os.environ[artifacts.PVC_ROOT_ENV]
        else:
            os.environ[artifacts.PVC_ROOT_ENV] = old


@pytest.fixture(scope="module")
def pvc_root():
    with pvc_root_env() as root:
        yield root


def pvc_store(namespace: str, claim: str = "artifacts") -> str:
    """A pvc:// artifacts.uri of the namespace's own, its claim mounted for the operators (as the
    chart's artifactClaims entry {namespace, claim, operatorClaim} would)."""
    (operator_pvc_root() / namespace / claim).mkdir(parents=True, exist_ok=True)
    return f"pvc://{claim}/{namespace}"


@pytest.fixture(scope="module")
def operator(kube_cluster, pvc_root, tmp_path_factory):
    install_operator_prereqs(kube_cluster)
    op = OperatorProcess(kube_cluster, tmp_path_factory.mktemp("operator") / "operator.log").start()
    yield op
    op.stop()


@pytest.fixture
def kube(kube_cluster, operator):
    ns = f"mdj-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", ns)
    yield Kube(kube_cluster, ns)
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_quickstart_pipeline_to_serving(kube, operator):
    uri = pvc_store(kube.ns)
    started = time.monotonic()
    kube.apply(quickstart("quickstart", uri))
    first = kube.wait_rayjob("quickstart-teacher-a1", timeout=10)
    assert time.monotonic() - started < 10

    job = kube.job("quickstart")
    spec = first["spec"]
    assert spec["entrypoint"] == "python -m meddistill.jobs teacher"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    sent = json.loads(env["MEDDISTILL_JOB"])
    # uid: the stage writes under <uri>/<namespace>/<name>-<uid8>/ (a re-created job never inherits artifacts)
    assert sent["metadata"] == {"name": "quickstart", "namespace": kube.ns, "uid": job["metadata"]["uid"]}
    assert MedDistillJob.model_validate(sent).spec == MedDistillJob.model_validate({**job, "status": None}).spec
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    assert spec["ttlSecondsAfterFinished"] == 0 and "suspend" not in spec  # the stage's Ray cluster goes when it ends
    owner = first["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"], owner["blockOwnerDeletion"]) == (
        "MedDistillJob", job["metadata"]["uid"], True, True)
    labels = first["metadata"]["labels"]
    assert labels["meddistill.io/stage"] == "teacher" and labels["meddistill.io/attempt"] == "1"
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 1
    container = worker["template"]["spec"]["containers"][0]
    assert container["image"] == (job["spec"].get("image") or default_image())  # the operator's own image by default
    resources = job["spec"]["teacher"]["resources"]  # the quickstart's teacher workers, as applied
    assert container["resources"]["limits"] == {"cpu": str(resources["cpusPerWorker"]), "memory": resources["memory"]}
    assert "finalizers" not in job["metadata"]  # deleting never waits for the operator

    digests = {}
    for stage in STAGES:
        digests[stage] = finish_stage(kube, uri, "quickstart", stage)
        if stage != "evaluate":
            nxt = STAGES[STAGES.index(stage) + 1]
            kube.wait_rayjob(f"quickstart-{nxt}-a1")
            st = kube.job("quickstart")["status"]
            assert st["phase"] == "Running"

    service = wait_for(lambda: kube.rayservices("quickstart"), 20, "the RayService")[0]
    assert service["metadata"]["name"] == "quickstart"
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    quantize_uri = artifacts.stage_uri(uri, kube.job_dir("quickstart"), "quantize")
    assert quantize_uri in service["spec"]["serveConfigV2"]
    # The RayService is created before the status that announces it is written.
    wait_for(lambda: kube.job("quickstart")["status"]["currentStage"] == "serving", 10, "currentStage serving")
    assert kube.job("quickstart")["status"]["phase"] == "Running"

    kube.custom.patch_namespaced_custom_object_status("ray.io", "v1", kube.ns, "rayservices", "quickstart", {"status": {
        "serviceStatus": "Running",
        "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints",
                        "message": "Number of serve endpoints is greater than 0", "lastTransitionTime": now_rfc3339()}]}})
    st = wait_for(lambda: (s := kube.job("quickstart").get("status", {})).get("phase") == "Serving" and s, 20, "phase Serving")

    assert st["serving"]["endpoint"] == f"http://quickstart-serve-svc.{kube.ns}.svc:8000/v1" and st["serving"]["ready"]
    assert [s["state"] for s in st["stages"]] == ["Succeeded"] * 5
    assert {s["name"]: s["artifactDigest"] for s in st["stages"]} == digests
    assert st["results"]["accuracyRetentionPct"] == 87.5 and st["accuracy"] == "52.5%"
    # The status survives the CRD's structural schema whole (nothing pruned or defaulted away).
    assert [(r["model"], r["n"]) for r in st["results"]["rows"]] == [("teacher", 40), ("quantized", 40)]
    assert MedDistillJobStatus.model_validate(st)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Failed"]["status"] == "False"
    assert st["observedGeneration"] == kube.job("quickstart")["metadata"]["generation"]

    operator.wait_resyncs()  # later reconciles (events, resyncs) leave it as it is
    assert kube.job("quickstart")["status"] == st
    table = kube.cluster.kubectl("get", "mdj", "-n", kube.ns).stdout
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "STAGE", "ACCURACY", "AGE"]
    assert table.split("\n")[1].split()[:3] == ["quickstart", "Serving", "52.5%"]
    events = wait_for(lambda: (e := kube.events("quickstart")) and "ServingReady" in e and e, 10, "events")
    assert {"StageStarted", "StageSucceeded", "ServingCreated", "ServingReady"} <= set(events)
    assert len(kube.rayjobs("quickstart")) == 5  # one per stage, none duplicated
    assert "Forbidden" not in operator.log(), operator.log()[-2000:]  # the chart's RBAC covers the whole pipeline
    assert 'meddistill_operator_children_created_total{resource="rayjobs"}' in operator.metrics()


def test_failure_retries_then_fails_with_reason(kube, operator):
    kube.apply(quickstart("flaky", pvc_store(kube.ns), runPolicy={"backoffLimit": 1}))
    kube.wait_rayjob("flaky-teacher-a1")
    kube.kuberay_fails("flaky-teacher-a1", "DeadlineExceeded", "the RayJob has passed the activeDeadlineSeconds")
    kube.wait_rayjob("flaky-teacher-a2")  # after attempt 1's 10 s backoff
    # The child is created before the status that records it is written.
    wait_for(lambda: kube.job("flaky")["status"]["stages"][0]["attempt"] == 2, 10, "status attempt 2")
    kube.kuberay_fails("flaky-teacher-a2", "AppFailed", "Job entrypoint command failed with exit code 1")
    st = wait_for(lambda: (s := kube.job("flaky").get("status", {})).get("phase") == "Failed" and s, 20, "phase Failed")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and "AppFailed" in failed["message"] and "exit code 1" in failed["message"]
    operator.wait_resyncs()  # the operator looked again: nothing new is started
    assert sorted(kube.rayjobs("flaky")) == ["flaky-teacher-a1", "flaky-teacher-a2"]
    assert "JobFailed" in wait_for(lambda: kube.events("flaky"), 10, "events")


def test_operator_restart_mid_pipeline_no_duplicates(kube, operator):
    uri = pvc_store(kube.ns)
    kube.apply(quickstart("restart", uri))
    finish_stage(kube, uri, "restart", "teacher")
    kube.wait_rayjob("restart-distill-data-a1")
    operator.stop(kill=True)  # SIGKILL mid-pipeline
    # While it is down, KubeRay finishes the running stage.
    kube.kuberay_runs("restart-distill-data-a1")
    write_stage_artifact(uri, kube.job_dir("restart"), "distill-data")
    kube.kuberay_succeeds("restart-distill-data-a1")
    operator.start()
    kube.wait_rayjob("restart-distill-a1")
    operator.wait_resyncs()  # the restarted operator looked again: no duplicate
    assert sorted(kube.rayjobs("restart")) == ["restart-distill-a1", "restart-distill-data-a1", "restart-teacher-a1"]
    st = kube.job("restart")["status"]
    assert [s["state"] for s in st["stages"]] == ["Succeeded", "Succeeded", "Running", "Pending", "Pending"]


def test_suspend_resume_and_delete(kube, operator):
    uri = pvc_store(kube.ns)
    kube.apply(quickstart("pause", uri))
    kube.wait_rayjob("pause-teacher-a1")
    kube.apply(quickstart("pause", uri, suspend=True))
    wait_for(lambda: not kube.rayjobs("pause"), 20, "the running RayJob to be removed")
    st = wait_for(lambda: (s := kube.job("pause").get("status", {})).get("phase") == "Suspended" and s, 20, "Suspended")
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["status"] == "True"
    operator.wait_resyncs()
    assert not kube.rayjobs("pause")  # nothing starts while suspended

    kube.apply(quickstart("pause", uri, suspend=False))
    kube.wait_rayjob("pause-teacher-a1")
    wait_for(lambda: kube.job("pause").get("status", {}).get("phase") == "Running", 20, "Running again")

    kube.cluster.kubectl("delete", "mdj", "pause", "-n", kube.ns, "--wait=true", "--timeout=20s")  # no finalizer
    wait_for(lambda: not kube.rayjobs("pause"), 120, "the garbage collector to delete the job's RayJobs", interval=1)


INVALID = [
    ({"student": {"derive": {"keepLayers": 20}, "model": "x"}}, "set exactly one of student.model"),
    ({"serving": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas must be <= maxReplicas"),
    ({"distillation": {"mode": "sequence", "teacherCache": "online"}}, "teacherCache online is only available in logits mode"),
    ({"quantization": {"method": "int3"}}, 'Unsupported value: "int3"'),
    ({"teacher": {"model": "builtin:smollm2-135m-instruct", "datasets": ["pubmedqa:x.json"], "method": "lora"}},
     "method lora/qlora needs a lora section"),
]


@pytest.mark.parametrize("change,message", INVALID, ids=[m.split()[0] for _, m in INVALID])
def test_apiserver_refuses_invalid_jobs(kube, change, message):
    doc = quickstart("bad", "pvc://artifacts/x")
    for key, value in change.items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value}
    res = kube.cluster.kubectl("create", "--dry-run=server", "-n", kube.ns, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert res.returncode != 0 and message in res.stderr, res.stderr


def test_apiserver_refuses_too_long_name(kube):
    doc = quickstart("a-name-that-is-much-longer-than-30", "pvc://artifacts/x")
    res = kube.cluster.kubectl("create", "--dry-run=server", "-n", kube.ns, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert res.returncode != 0 and f"at most {NAME_MAX} characters" in res.stderr, res.stderr


# The whole tests/invalid_specs/ collection runs through both the CLI and the API server in
# tests/test_cli_crd_parity.py.
