"""The Ray cluster backend's render/observe halves and its garbage-collection decisions, without a cluster.

The real Jobs API, Serve REST API and deletion are exercised end to end in tests/test_e2e_ray.py.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import pytest
import yaml

from meddistill.operator.backends import raycluster
from meddistill.operator.backends import raycluster_objects as rb
from meddistill.operator.backends.ray_clusters import AllowedCluster
from meddistill.operator.planner import Observed, Serve, StartStage, plan
from meddistill.serve.config import IMPORT_PATH
from meddistill.spec.models import MedDistillJob
from tests.support.kube_cluster import REPO_ROOT


def job(name: str = "qs", namespace: str = "team-a") -> MedDistillJob:
    doc = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["ray"] = {"address": "http://head:8265"}
    return MedDistillJob.model_validate(doc)


def details(stage="teacher", attempt=1, status="RUNNING", **extra) -> dict:
    meta = {rb.META_JOB: "team-a/qs", rb.META_UID: "u1", rb.META_STAGE: stage, rb.META_ATTEMPT: str(attempt)}
    return {"submission_id": rb.submission_id("team-a", "qs", stage, attempt), "status": status, "metadata": meta,
            "start_time": 1_700_000_000_000, "end_time": None, **extra}


def test_submission_carries_the_job_document_names_and_resources():
    j = job()
    sub = rb.submission(j, "u1", StartStage("teacher", 2, "qs-teacher-a2"))
    assert sub["entrypoint"] == "python -m meddistill.jobs teacher"
    assert sub["submission_id"] == "team-a_qs_teacher_a2"
    assert sub["metadata"] == {rb.META_JOB: "team-a/qs", rb.META_UID: "u1", rb.META_STAGE: "teacher", rb.META_ATTEMPT: "2"}
    sent = json.loads(sub["runtime_env"]["env_vars"]["MEDDISTILL_JOB"])
    assert MedDistillJob.model_validate(sent).spec == j.spec and sent["metadata"] == {"name": "qs", "namespace": "team-a"}
    # Ray Train workers reserve the teacher's 2 CPUs; a driver reserving them too would deadlock 2 cores.
    assert (sub["entrypoint_num_cpus"], sub["entrypoint_num_gpus"], sub["entrypoint_memory"]) == (0, 0, 0)
    quant = rb.submission(j, "u1", StartStage("quantize", 1, "qs-quantize-a1"))
    assert (quant["entrypoint_num_cpus"], quant["entrypoint_memory"]) == (2, 6 * 2**30)


@pytest.mark.parametrize("status,state", [("PENDING", "Pending"), ("RUNNING", "Running"), ("SUCCEEDED", "Succeeded"),
                                          ("FAILED", "Failed"), ("STOPPED", "Deleting")])
def test_ray_job_status_maps_to_run_state(status, state):
    run = rb.stage_run(details(status=status, attempt=3))
    assert (run.stage, run.attempt, run.name, run.state) == ("teacher", 3, "team-a_qs_teacher_a3", state)
    assert run.start_time == "2023-11-14T22:13:20Z"


def test_failure_message_has_the_error_class_and_ray_message_head_only():
    logs = "loading\nTraceback (most recent call last):\n  File x\nFileNotFoundError: /nope\nerror: stage teacher: FileNotFoundError: /nope\n"
    d = details(status="FAILED", error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
                message="Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n" + logs)
    run = rb.stage_run(d, logs, "https://ray.example:8265")
    assert run.reason == "JOB_ENTRYPOINT_COMMAND_ERROR"
    assert run.message == ("stage teacher raised FileNotFoundError | Job entrypoint command failed with exit code 1 | "
                           "full log: ray job logs team-a_qs_teacher_a1 --address https://ray.example:8265")
    assert len(rb.failure_message(d, "x" * 10_000)) <= 400


def test_a_job_that_is_not_a_stage_run_is_ignored():
    assert rb.stage_run({"submission_id": "raysubmit_1", "status": "RUNNING", "metadata": {}}) is None


def test_serve_application_is_the_rayservice_app_renamed_and_routed_per_job():
    j = job()
    app = rb.serve_application(j, Serve("qs", "/runs/qs/quantize"))
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("mdj_team-a_qs", "/team-a/qs", IMPORT_PATH)
    assert app["args"]["model_source"] == "/runs/qs/quantize"
    assert rb.job_of_route(app["route_prefix"]) == ("team-a", "qs")
    observed = rb.serving_app("mdj_team-a_qs", {"status": "RUNNING", "deployed_app_config": app})
    assert (observed.model_uri, observed.ready, observed.deleting) == ("/runs/qs/quantize", True, False)
    assert rb.serving_app("x", {"status": "DELETING", "deployed_app_config": app}).deleting


def test_deploy_config_changes_only_our_app_and_keeps_serves_http_options():
    other = {"name": "someone-else", "route_prefix": "/other", "import_path": "x:y"}
    mine = {"name": "mdj_team-a_qs", "route_prefix": "/team-a/qs", "import_path": IMPORT_PATH, "args": {"model_source": "old"}}
    running = {"http_options": {"host": "127.0.0.1", "port": 8123}, "proxy_location": "HeadOnly",
               "applications": {a["name"]: {"deployed_app_config": a} for a in (other, mine)}}
    new = {**mine, "args": {"model_source": "new"}}
    put = rb.deploy_config(running, put=[new])
    assert put["applications"] == [other, new]
    assert put["http_options"] == {"host": "127.0.0.1", "port": 8123} and put["proxy_location"] == "HeadOnly"
    assert rb.deploy_config(running, remove={"mdj_team-a_qs"})["applications"] == [other]
    assert rb.deploy_config({"applications": {}}, put=[new])["http_options"] == {"host": "0.0.0.0", "port": 8000}


def test_deploy_config_refuses_to_drop_an_imperative_app():
    running = {"applications": {"notebook": {"deployed_app_config": None}}}
    with pytest.raises(rb.RayBackendError, match="'notebook'.*serve.run"):
        rb.deploy_config(running, put=[{"name": "mdj-a-b"}])


def test_deploy_config_leaves_out_an_app_that_is_being_deleted():
    # Serve clears a deleted app's deployed_app_config while it drains (seen in CI: the previous test's app).
    running = {"applications": {"mdj_team-a_rep": {"status": "DELETING", "deployed_app_config": None}}}
    assert rb.deploy_config(running, put=[{"name": "mdj_team-a_old"}])["applications"] == [{"name": "mdj_team-a_old"}]
    with pytest.raises(rb.RayBackendError, match="serve.run"):  # a running one without a config is still refused
        rb.deploy_config({"applications": {"nb": {"status": "RUNNING", "deployed_app_config": None}}}, put=[])


def test_ray_client_addresses_are_refused_with_the_fix():
    with pytest.raises(rb.RayBackendError, match=r"Ray cluster address 'ray://head:10001'.*http://<head>:8265"):
        rb.dashboard_address("ray://head:10001")


def test_the_same_planner_starts_the_first_stage_on_ray():
    p = plan(job(), Observed(), datetime.now(timezone.utc))
    assert [type(c).__name__ for c in p.create] == ["StartStage"] and p.create[0].stage == "teacher"
    assert rb.submission(job(), "u1", p.create[0])["submission_id"] == "team-a_qs_teacher_a1"


class RecordingCluster(raycluster.RayCluster):
    """Records what garbage collection removes instead of calling the cluster (the decisions are tested here)."""

    def __init__(self):
        super().__init__(AllowedCluster(name="head", address="http://head:8265"))
        self.stopped, self.removed_apps = [], set()

    def stop_and_delete(self, sid):
        self.stopped.append(sid)

    def remove_apps(self, names):
        self.removed_apps |= names


def test_garbage_collection_removes_what_no_live_job_owns():
    def run(job_key, uid, stage="teacher", status="RUNNING"):
        ns, name = job_key.split("/")
        return {"submission_id": rb.submission_id(ns, name, stage, 1), "status": status,
                "metadata": {rb.META_JOB: job_key, rb.META_UID: uid, rb.META_STAGE: stage, rb.META_ATTEMPT: "1"}}

    snapshot = raycluster.Snapshot(
        runs=[run("a/live", "u1"), run("a/live", "u1", "distill", "STOPPED"), run("a/gone", "u2"),
              run("a/renewed", "old-uid"), run("b/elsewhere", "u3")],
        apps={"mdj_a_live": {"route_prefix": "/a/live"}, "mdj_a_gone": {"route_prefix": "/a/gone"},
              "mdj_b_elsewhere": {"route_prefix": "/b/elsewhere"}},
    )
    live = {("a", "live"): "u1", ("a", "renewed"): "new-uid"}
    c = RecordingCluster()
    removed = c.collect_garbage(snapshot, live, namespace="a")  # an operator watching namespace a only
    assert c.stopped == ["a_live_distill_a1", "a_gone_teacher_a1", "a_renewed_teacher_a1"]
    assert c.removed_apps == {"mdj_a_gone"}
    assert set(removed) == set(c.stopped) | c.removed_apps
    c = RecordingCluster()
    c.collect_garbage(snapshot, live, namespace=None)  # cluster-wide: b/elsewhere is gone too
    assert "b_elsewhere_teacher_a1" in c.stopped and c.removed_apps == {"mdj_a_gone", "mdj_b_elsewhere"}


def test_secrets_reach_stages_and_the_serve_app_as_kuberay_pods_get_them():
    doc = job().model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["artifacts"] = {"uri": "s3://bucket/runs", "secretName": "s3-creds"}
    doc["spec"]["serving"]["auth"] = {"secretName": "serve-token", "key": "token"}
    j = MedDistillJob.model_validate(doc)
    s3 = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "shh"}
    secrets = {"s3-creds": s3, "serve-token": {"token": "t0k3n\n"}}

    assert rb.secret_refs(j, serving=False) == {"spec.artifacts.secretName": "s3-creds"}
    assert rb.secret_refs(j, serving=True) == {"spec.artifacts.secretName": "s3-creds",
                                               "spec.serving.auth.secretName": "serve-token"}
    stage_env = rb.secret_env(j, secrets, serving=False)
    assert stage_env == s3  # every key, as envFrom; never the serving token
    sub = rb.submission(j, "u1", StartStage("teacher", 1, "qs-teacher-a1"), stage_env)
    assert sub["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "shh" and "MEDDISTILL_JOB" in sub["runtime_env"]["env_vars"]

    app = rb.serve_application(j, Serve("qs", "s3://bucket/runs/qs/quantize"), rb.secret_env(j, secrets, serving=True))
    # the token's digest only: Ray shows an app's runtime_env to every holder of the cluster's token
    assert app["runtime_env"]["env_vars"] == {**s3, "MEDDISTILL_SERVE_TOKEN_SHA256": hashlib.sha256(b"t0k3n").hexdigest()}
    assert "t0k3n" not in json.dumps(app)
    assert app["args"]["require_auth"] is True
    assert "runtime_env" not in rb.serve_application(job(), Serve("qs", "/m"), {})

    with pytest.raises(rb.SecretUnavailable, match=r"no non-empty key 'token'.*spec.serving.auth.key.*it has: other"):
        rb.secret_env(j, {**secrets, "serve-token": {"other": "x"}}, serving=True)


def test_ray_ids_are_unambiguous_across_namespaces():
    # namespace a-b + job c and namespace a + job b-c: the same '-'-joined string, different jobs
    assert rb.submission_id("a-b", "c", "teacher", 1) != rb.submission_id("a", "b-c", "teacher", 1)
    assert rb.app_name("a-b", "c") != rb.app_name("a", "b-c")
    assert rb.route_prefix("a-b", "c") != rb.route_prefix("a", "b-c")
