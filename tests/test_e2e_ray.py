"""End to end on an existing Ray cluster: kubectl apply -> the real stages as Ray jobs -> Serving.

Real kube-apiserver + etcd (kube_cluster), a real local Ray head, `meddistill operator` as its own
process with the chart's RBAC, the real teacher/distill-data/distill/quantize/evaluate stages
submitted through the Ray Jobs API, the quantized student served as a Ray Serve app and asked a
PubMedQA question with the `openai` client. The pipeline runs once per session (tests/e2e_fixture.py:
quickstart_e2e); the delete test is last in this module because it removes the served app.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from meddistill import artifacts
from meddistill.data import load_dataset
from meddistill.prompts import build_messages, extract_answer
from meddistill.spec.models import Results
from tests.e2e_fixture import RAY_CLUSTER, wait_for_phase
from tests.test_operator_kube import quickstart, wait_for

pytest_plugins = ["tests.support.kube_fixtures", "tests.e2e_fixture"]
# The first test to use quickstart_e2e also pays for the whole pipeline (the fixture's own wait
# fails first, after e2e_fixture.PIPELINE_TIMEOUT_S, with the job's status).
pytestmark = [pytest.mark.slow, pytest.mark.kube, pytest.mark.e2e, pytest.mark.timeout(60 * 60)]

STAGES = ["teacher", "distill-data", "distill", "quantize", "evaluate"]


def our_ray_jobs(ray, namespace: str, name: str) -> dict[str, dict]:
    return {j["submission_id"]: j for j in ray.jobs() if (j.get("metadata") or {}).get("meddistill.io/job") == f"{namespace}/{name}"}


def test_failed_stage_ends_failed_with_the_ray_error_after_retries(e2e_namespace, ray_head, ray_operator, tmp_path):
    kube, name = e2e_namespace, "broken"
    doc = quickstart(name, str(tmp_path / "runs"), ray={"cluster": RAY_CLUSTER}, runPolicy={"backoffLimit": 1})
    doc["spec"]["teacher"]["datasets"] = ["pubmedqa:/nonexistent/ori_pqal.json"]
    kube.apply(doc)
    st = wait_for_phase(kube, name, {"Failed"}, 600, ray_head)

    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    # The attempt that gave up, the stage's error class and where its full log is; never the log's text
    # (operator/failures.py: a log line can quote a training record), so not even the missing path.
    msg = failed["message"]
    assert f"{kube.ns}_{name}_teacher_a2 failed" in msg, msg
    assert re.search(r"stage teacher raised \w+Error", msg) and f"ray job logs {kube.ns}_{name}_teacher_a2" in msg, msg
    assert "/nonexistent/ori_pqal.json" not in msg and "Traceback" not in msg, msg
    assert st["stages"][0]["state"] == "Failed" and st["stages"][0]["attempt"] == 2
    assert [s["state"] for s in st["stages"][1:]] == ["Pending"] * 4
    ray_operator.wait_resyncs()  # the operator looked again: no third attempt
    jobs = our_ray_jobs(ray_head, kube.ns, name)
    assert sorted(jobs) == [f"{kube.ns}_{name}_teacher_a1", f"{kube.ns}_{name}_teacher_a2"]
    assert {j["status"] for j in jobs.values()} == {"FAILED"}
    events = wait_for(lambda: (e := kube.events(name)) and "JobFailed" in e and e, 20, "the JobFailed event")
    assert {"StageStarted", "StageRetrying", "JobFailed"} <= set(events)


def test_a_missing_secret_is_an_event_then_the_stage_gets_its_keys(e2e_namespace, ray_head, ray_operator, tmp_path):
    kube, name = e2e_namespace, "secrets"
    doc = quickstart(name, str(tmp_path / "runs"), ray={"cluster": RAY_CLUSTER}, runPolicy={"backoffLimit": 0})
    doc["spec"]["artifacts"]["secretName"] = "stage-env"
    doc["spec"]["teacher"]["datasets"] = ["pubmedqa:/nonexistent/ori_pqal.json"]  # fails at once: no CPU spent
    kube.apply(doc)
    wait_for(lambda: "SecretUnavailable" in kube.events(name), 30, "the SecretUnavailable event")
    assert not our_ray_jobs(ray_head, kube.ns, name)  # nothing is submitted without its Secret

    kube.cluster.kubectl("-n", kube.ns, "create", "secret", "generic", "stage-env", "--from-literal=MEDDISTILL_TEST_MARKER=m4rk")
    # Without its owner's consent label the Secret is not read: still no submission (the event names the label).
    assert "meddistill.io/inject" in str(kube.core.list_namespaced_event(kube.ns).items)
    ray_operator.wait_resyncs()  # the operator looked again with the unlabelled Secret there
    assert not our_ray_jobs(ray_head, kube.ns, name)
    kube.cluster.kubectl("-n", kube.ns, "label", "secret", "stage-env", "meddistill.io/inject=true")
    sid = f"{kube.ns}_{name}_teacher_a1"
    wait_for(lambda: sid in our_ray_jobs(ray_head, kube.ns, name), 30, f"Ray job {sid}")
    env = ray_head.get(f"/api/jobs/{sid}")["runtime_env"]["env_vars"]
    assert env["MEDDISTILL_TEST_MARKER"] == "m4rk" and "MEDDISTILL_JOB" in env
    assert kube.events(name).count("SecretUnavailable") == 1  # posted once, not every resync
    kube.cluster.kubectl("-n", kube.ns, "delete", "mdj", name)


def test_every_stage_ran_as_a_ray_job_and_succeeded(quickstart_e2e):
    run, ns = quickstart_e2e, quickstart_e2e.kube.ns
    st = run.status
    assert [(s["name"], s["state"]) for s in st["stages"]] == [(s, "Succeeded") for s in STAGES]
    for s in st["stages"]:
        directory = run.artifact_root / s["name"]
        assert s["artifactUri"] == f"{run.artifact_root}/{s['name']}"  # <uri>/<namespace>/<name>-<uid[:8]>/<stage>
        assert s["artifactDigest"] == artifacts.verify(directory).digest  # the manifest the stage wrote
        # unambiguous across namespaces; a retry says why the first attempt failed
        assert s["child"] == f"{ns}_{run.name}_{s['name']}_a1", (s.get("lastFailure"), run.kube.events(run.name))
    jobs = our_ray_jobs(run.ray, ns, run.name)
    assert sorted(jobs) == sorted(f"{ns}_{run.name}_{s}_a1" for s in STAGES)  # one per stage, none duplicated
    assert {j["status"] for j in jobs.values()} == {"SUCCEEDED"}
    assert all(j["entrypoint"].startswith("python -m meddistill.jobs ") for j in jobs.values())
    assert "Forbidden" not in run.operator.log()
    assert run.token not in run.operator.log()  # Secret values are passed on, never logged


def test_status_holds_the_results_table(quickstart_e2e):
    st = quickstart_e2e.status
    on_disk = Results.model_validate(json.loads((quickstart_e2e.artifact_root / "evaluate" / "results.json").read_text()))
    assert Results.model_validate(st["results"]) == on_disk
    rows = {r.model: r for r in on_disk.rows if r.dataset.startswith("pubmedqa:") and r.scoring == "generative"}
    assert set(rows) == {"base", "teacher", "student", "quantized"} and all(r.n == 40 for r in rows.values())
    assert st["accuracy"] == f"{rows['quantized'].accuracy * 100:.1f}%"
    assert st["phase"] == "Serving" and st["currentStage"] == ""
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds["Ready"] == "True" and conds["Failed"] == "False"
    table = quickstart_e2e.kube.cluster.kubectl("get", "mdj", quickstart_e2e.name, "-n", quickstart_e2e.kube.ns).stdout
    assert table.split("\n")[1].split()[:3] == ["quickstart", "Serving", st["accuracy"]]


def test_openai_client_gets_a_pubmedqa_answer_from_the_endpoint_in_status(quickstart_e2e):
    from openai import AuthenticationError, OpenAI

    run, ns = quickstart_e2e, quickstart_e2e.kube.ns
    assert run.endpoint == f"http://127.0.0.1:{run.ray.serve_port}/{ns}/{run.name}/v1"
    assert run.status["serving"]["ready"] is True and run.status["serving"]["child"] == f"mdj_{ns}_{run.name}"
    # serving.auth: the token from the job's Secret, passed on by the operator, is required.
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=run.endpoint, api_key="not-the-token", max_retries=0, timeout=60).models.list()
    client = OpenAI(base_url=run.endpoint, api_key=run.token, timeout=120)
    assert [m.id for m in client.models.list().data] == [run.model_name]

    records = load_dataset("pubmedqa:@samples/pubmedqa/ori_pqal.json#test", limit=5).records
    answers = []
    for record in records:  # a few questions: a 12-step student does not always keep the format
        reply = client.chat.completions.create(model=run.model_name, messages=build_messages(record),
                                               max_tokens=8, temperature=0)
        text = reply.choices[0].message.content
        assert text and reply.usage.completion_tokens > 0
        answers.append(extract_answer(text, record, record.options).answer)
    assert any(a in ("yes", "no", "maybe") for a in answers), answers


def _max_4gram_count(text: str) -> int:
    """How often the most frequent word 4-gram occurs (the evaluation's repetition test: > 2)."""
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    return max(grams.values(), default=0)


def _readme_answers(run) -> tuple[str, dict]:
    """The served student's replies to the README's two example requests (chat, medical endpoint)."""
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=run.endpoint, api_key=run.token, timeout=120)
    reply = client.chat.completions.create(model=run.model_name, max_tokens=96, temperature=0,
                                           messages=[{"role": "user", "content": "What is hypertension?"}])
    body = {"question": "Which drug is first-line for type 2 diabetes?", "options": {"A": "Metformin", "B": "Insulin"}}
    answer = httpx.post(f"{run.endpoint}/medical/answer", json=body, timeout=120,
                        headers={"Authorization": f"Bearer {run.token}"}).json()
    return reply.choices[0].message.content, answer


def test_another_tenant_of_the_ray_cluster_finds_no_serving_token_in_its_apis(quickstart_e2e):
    """Whoever holds the cluster's token (every tenant of a shared Ray cluster) reads every job's and Serve
    app's runtime_env; the endpoint's token is not there, only its SHA-256, which opens nothing."""
    import hashlib

    run = quickstart_e2e
    apps = json.dumps(run.ray.get("/api/serve/applications/"))
    jobs = json.dumps(run.ray.get("/api/jobs/"))
    assert f"mdj_{run.kube.ns}_{run.name}" in apps and f"{run.kube.ns}_{run.name}_teacher_a1" in jobs  # the right APIs
    assert run.token not in apps and run.token not in jobs
    digest = hashlib.sha256(run.token.encode()).hexdigest()
    assert digest in apps  # what the replicas check requests against
    from openai import AuthenticationError, OpenAI
    with pytest.raises(AuthenticationError):  # the digest itself is no token
        OpenAI(base_url=run.endpoint, api_key=digest, max_retries=0, timeout=60).models.list()


def test_served_student_answers_the_readme_examples_without_repeating_itself(quickstart_e2e):
    text, answer = _readme_answers(quickstart_e2e)
    assert len(text.split()) >= 5 and _max_4gram_count(text) <= 2, text  # the old student: "Lab End" x15
    assert answer["text"].strip() and _max_4gram_count(answer["text"]) <= 2, answer["text"]


def test_served_student_answers_the_readme_examples_correctly(quickstart_e2e):
    """Names blood pressure (the chat gets the system prompt the student was trained under) and answers
    with a letter (the instruction no longer shows a placeholder 'X' to copy)."""
    text, answer = _readme_answers(quickstart_e2e)
    assert "blood pressure" in text.lower(), text
    assert answer["answer"] in ("A", "B"), answer


def _general_rows(run) -> dict:
    """Each model's row on the shipped general keyword questions, from the job's own evaluation."""
    results = Results.model_validate(json.loads((run.artifact_root / "evaluate" / "results.json").read_text()))
    rows = {r.model: r for r in results.rows if "general_medical_keywords" in r.dataset}
    assert set(rows) == {"base", "teacher", "student", "quantized"}, [r.dataset for r in results.rows]
    return rows


def test_general_answers_survive_fine_tuning_and_distillation(quickstart_e2e):
    """Teacher and 16-bit student keep >= 80 % of the base model's keyword hits, and no model after
    the base gives more repetitive answers than it does."""
    rows = _general_rows(quickstart_e2e)
    base = rows["base"]
    assert all(r.keyword_n == base.keyword_n >= 20 for r in rows.values())
    for kind in ("teacher", "student"):
        assert rows[kind].keyword_hits >= 0.8 * base.keyword_hits, (kind, rows[kind].keyword_hits, base.keyword_hits)
    for kind in ("teacher", "student", "quantized"):
        assert rows[kind].repetitive_n <= base.repetitive_n, (kind, rows[kind].repetitive_n, base.repetitive_n)


def test_quantized_student_keeps_80_percent_of_the_base_models_keyword_hits(quickstart_e2e):
    """Plain NF4 hit 14/24 here; mixedPrecision: sensitive keeps the projections 4 bits hurt most in 16 bits."""
    rows = _general_rows(quickstart_e2e)
    assert rows["quantized"].keyword_hits >= 0.8 * rows["base"].keyword_hits


def test_zz_kubectl_delete_removes_the_serve_app_and_the_ray_jobs(quickstart_e2e):
    """Last in the module: it takes the served model away."""
    run, ns = quickstart_e2e, quickstart_e2e.kube.ns
    app = f"mdj_{ns}_{run.name}"
    assert app in run.ray.serve_apps()
    run.kube.cluster.kubectl("delete", "mdj", run.name, "-n", ns, "--wait=true", "--timeout=30s")  # no finalizer
    wait_for(lambda: app not in run.ray.serve_apps(), 120, f"the Serve app {app} to be removed", interval=1)
    wait_for(lambda: not our_ray_jobs(run.ray, ns, run.name), 60, "the job's Ray job records to be deleted", interval=1)
