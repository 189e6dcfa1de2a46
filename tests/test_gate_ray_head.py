"""The evaluation gate on a real Ray head: the operator (Ray cluster backend, real kube-apiserver)
withholds a model that fails its gate, then deploys it as a Serve app on the head once a named
person overrides, and status records who.

Cheap by design: no stage runs. The tiny pipeline's finished artifacts are copied under the new
job's name and the job's status is written as a restarted operator would find it (every stage
Succeeded with its digest, the table from results.json) in the job's own directory, which needs its
uid: the job starts suspended so nothing is submitted before that, then resumes straight into the
gate. The floor sits just above the accuracy the tiny pipeline measured. Reuses the session's Ray
head and operator (tests/e2e_fixture.py).
"""
from __future__ import annotations

import json
import shutil

import pytest

from meddistill import artifacts
from meddistill.gate import OVERRIDE_ANNOTATION
from meddistill.spec.models import pipeline_stages
from tests.e2e_fixture import wait_for_phase
from tests.pipeline_fixture import tiny_job_document
from tests.test_operator_kube import wait_for

pytestmark = [pytest.mark.kube, pytest.mark.slow]

NAME = "gate-ray"


def condition(st: dict, ctype: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == ctype), {})


def test_failing_gate_withholds_then_override_serves_on_the_ray_head(tiny_pipeline, tiny_model_dir, e2e_namespace,
                                                                      ray_head, ray_operator, tmp_path):
    ctx, _ = tiny_pipeline
    kube = e2e_namespace
    runs = tmp_path / "runs"
    finished = artifacts.local_path(ctx.uri("evaluate")).parent
    results = json.loads((finished / "evaluate" / "results.json").read_text())
    ref = ctx.spec.evaluation.datasets[0]
    measured = next(r["accuracy"] for r in results["rows"]
                    if r["model"] == "quantized" and r["dataset"] == ref and r["scoring"] == "generative")
    assert measured < 1.0
    floor = round(measured + 0.01, 2)

    doc = tiny_job_document(str(tiny_model_dir), {"train": ctx.spec.teacher.datasets[0], "eval": ref}, str(runs), NAME)
    doc["spec"].update(ray={"address": ray_head.address}, suspend=True,
                       serving={"enabled": True, "gate": {"enabled": True, "notWorseThanBase": False,
                                                          "minAccuracy": [{"dataset": ref, "minAccuracy": floor}]}})
    kube.apply(doc)
    wait_for_phase(kube, NAME, {"Suspended"}, 60)
    # The operator's stages write under <uri>/<namespace>/<name>-<uid8> (tenancy): the copy goes where they would have.
    own = kube.job_dir(NAME)
    shutil.copytree(finished, runs / own)
    stages = [{"name": s, "state": "Succeeded", "attempt": 1, "artifactUri": artifacts.stage_uri(str(runs), own, s),
               "artifactDigest": artifacts.read_manifest(runs / own / s).digest} for s in pipeline_stages(ctx.spec)]
    kube.custom.patch_namespaced_custom_object_status("meddistill.io", "v1alpha1", kube.ns, "meddistilljobs", NAME,
                                                      {"status": {"stages": stages, "results": results}})
    doc["spec"]["suspend"] = False
    kube.apply(doc)

    st = wait_for_phase(kube, NAME, {"Succeeded", "Serving"}, 120)
    gate = condition(st, "EvaluationGate")
    assert st["phase"] == "Succeeded" and (gate["status"], gate["reason"]) == ("False", "Failed"), gate
    assert f"accuracy {measured:.2f} < {floor:.2f}" in gate["message"]
    assert condition(st, "LineageVerified")["status"] == "True"
    assert not [a for a in ray_head.serve_apps() if NAME in a]  # nothing served
    assert not [j for j in ray_head.jobs() if NAME in (j.get("submission_id") or "")]  # and no stage re-ran

    kube.cluster.kubectl("annotate", "mdj", NAME, "-n", kube.ns, f"{OVERRIDE_ANNOTATION}=Dr Jane Roe: tiny test model")
    st = wait_for_phase(kube, NAME, {"Serving"}, 600, ray_head)
    assert (st["gate"]["overriddenBy"], st["gate"]["overrideReason"]) == ("Dr Jane Roe", "tiny test model")
    assert condition(st, "EvaluationGate")["reason"] == "Overridden"
    assert wait_for(lambda: [a for a in ray_head.serve_apps() if NAME in a], 10, "the Serve app")
