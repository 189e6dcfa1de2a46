"""The operator reads a job's pvc:// store through the job's own namespace's claim.

The operator serves many namespaces and the chart mounts each one's claims apart
($MEDDISTILL_PVC_ROOT/<namespace>/<claim>, its artifactClaims); a same-named claim of another
namespace is other storage than the job's pods write, so it is never read, and a claim not mounted
for the job's namespace blocks the job with a condition naming the fix.
"""
from __future__ import annotations

import pytest
import yaml

from meddistill import artifacts
from meddistill.operator import served_lineage
from meddistill.operator.failures import ARTIFACT_STORE_UNAVAILABLE, ReconcileBlocked
from meddistill.operator.planner import Observed, StageRun
from meddistill.operator.stage_artifacts import operator_dir, read_artifact, with_artifacts
from meddistill.spec.models import MedDistillJob
from tests.support.kube_cluster import REPO_ROOT

STORE = "pvc://models/runs"


def job_in(namespace: str, evaluated: bool = False) -> MedDistillJob:
    doc = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"].update(namespace=namespace, uid="0123456789abcdef")  # the same name and uid in every namespace
    doc["spec"]["artifacts"] = {"uri": STORE}
    if evaluated:
        doc["status"] = {"stages": [{"name": "evaluate", "state": "Succeeded", "artifactDigest": "x"}]}
    return MedDistillJob.model_validate(doc)


@pytest.fixture
def pvc_root(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.PVC_ROOT_ENV, str(tmp_path))
    return tmp_path


def write_stage(job: MedDistillJob, stage: str) -> str:
    """A finished stage as the job's pods leave it, seen through the operator's mount of their claim."""
    d = operator_dir(job, artifacts.stage_uri(STORE, artifacts.job_dir(job.metadata), stage))
    d.mkdir(parents=True, exist_ok=True)
    (d / "output.txt").write_text(f"{job.metadata.namespace} {stage}\n")
    return artifacts.write_manifest(d, stage=stage, config={}).digest


def test_same_named_claims_of_two_namespaces_resolve_to_their_own_folders(pvc_root):
    for ns in ("team-a", "team-b"):
        (pvc_root / ns / "models").mkdir(parents=True)
    a, b = job_in("team-a"), job_in("team-b")
    assert operator_dir(a, STORE) == pvc_root / "team-a" / "models" / "runs"
    assert operator_dir(b, STORE) == pvc_root / "team-b" / "models" / "runs"

    digest = write_stage(a, "teacher")
    assert read_artifact(a, "teacher").digest == digest
    assert read_artifact(a, "teacher").uri.startswith(f"{STORE}/team-a/")  # status keeps the job's own URI
    assert read_artifact(b, "teacher") is None  # team-a's manifest is not team-b's stage having succeeded
    assert write_stage(b, "teacher") != digest and read_artifact(b, "teacher").digest != digest


def test_a_claim_not_mounted_for_the_jobs_namespace_blocks_naming_the_fix(pvc_root):
    (pvc_root / "team-a" / "models").mkdir(parents=True)  # mounted for team-a only
    write_stage(job_in("team-a"), "teacher")
    b = job_in("team-b")
    with pytest.raises(ReconcileBlocked) as blocked:  # before any stage: the reconcile submits nothing
        with_artifacts(b, Observed())
    assert blocked.value.reason == ARTIFACT_STORE_UNAVAILABLE
    message = str(blocked.value)
    assert "namespace team-b" in message and "claim models" in message
    assert "add {namespace: team-b, claim: models, operatorClaim:" in message and "artifactClaims" in message
    succeeded = Observed(runs=(StageRun("teacher", 1, "quickstart-teacher-a1", "Succeeded"),))
    with pytest.raises(ReconcileBlocked):  # nor is team-a's finished teacher taken for team-b's
        with_artifacts(b, succeeded)
    assert with_artifacts(job_in("team-a"), succeeded).runs[0].artifact is not None


def test_the_served_lineage_is_checked_on_the_jobs_own_claim(pvc_root):
    for ns in ("team-a", "team-b"):
        (pvc_root / ns / "models").mkdir(parents=True)
    a = job_in("team-a", evaluated=True)
    quantized = write_stage(a, "quantize")
    d = operator_dir(a, artifacts.stage_uri(STORE, artifacts.job_dir(a.metadata), "evaluate"))
    d.mkdir(parents=True)
    (d / "results.json").write_text("{}")
    artifacts.write_manifest(d, stage="evaluate", config={}, inputs={"quantize": quantized})
    assert served_lineage.check(a, Observed()).verified is True
    assert served_lineage.check(job_in("team-b", evaluated=True), Observed()) is None  # nothing of team-b's yet
    with pytest.raises(ReconcileBlocked):  # unmounted for team-c: blocked, never another namespace's verdict
        served_lineage.check(job_in("team-c", evaluated=True), Observed())


def evaluated_in(job: MedDistillJob) -> None:
    quantized = write_stage(job, "quantize")
    d = operator_dir(job, artifacts.stage_uri(STORE, artifacts.job_dir(job.metadata), "evaluate"))
    d.mkdir(parents=True)
    (d / "results.json").write_text('{"rows": [{"model": "quantized", "accuracy": 0.9}]}')
    artifacts.write_manifest(d, stage="evaluate", config={}, inputs={"quantize": quantized})


@pytest.mark.parametrize("planted", ["stage folder", "manifest file", "job folder", "namespace folder"])
def test_a_symlink_planted_in_a_tenants_own_claim_does_not_read_another_namespaces_artifacts(pvc_root, planted):
    """The attack: team-b cannot mount team-a's claim, but the operator mounts both under one folder, so
    team-b writes a link into its own claim that points at where the operator sees team-a's results."""
    for ns in ("team-a", "team-b"):
        (pvc_root / ns / "models").mkdir(parents=True)
    a, b = job_in("team-a", evaluated=True), job_in("team-b", evaluated=True)
    evaluated_in(a)
    stage_dir = lambda job, stage: operator_dir(job, artifacts.stage_uri(STORE, artifacts.job_dir(job.metadata), stage))  # noqa: E731
    a_evaluate, b_evaluate = stage_dir(a, "evaluate"), stage_dir(b, "evaluate")
    link, target = {
        "stage folder": (b_evaluate, a_evaluate),
        "manifest file": (b_evaluate / artifacts.MANIFEST, a_evaluate / artifacts.MANIFEST),
        "job folder": (b_evaluate.parent, a_evaluate.parent),
        "namespace folder": (b_evaluate.parent.parent, a_evaluate.parent.parent),
    }[planted]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    assert (b_evaluate / "results.json").exists() or planted == "manifest file"  # the link does lead there

    for read in (lambda: read_artifact(b, "evaluate"), lambda: served_lineage.check(b, Observed()),
                 lambda: with_artifacts(job_in("team-b"), Observed(runs=(StageRun("evaluate", 1, "quickstart-evaluate-a1", "Succeeded"),)))):
        with pytest.raises(ReconcileBlocked) as blocked:
            read()
        assert blocked.value.reason == ARTIFACT_STORE_UNAVAILABLE
        assert "symlink" in str(blocked.value) and "team-a" not in str(blocked.value), str(blocked.value)
    assert read_artifact(a, "evaluate").results["rows"][0]["accuracy"] == 0.9  # team-a's own reads are untouched


def test_a_symlink_that_stays_inside_the_claim_is_followed(pvc_root):
    (pvc_root / "team-a" / "models" / "elsewhere").mkdir(parents=True)
    a = job_in("team-a")
    (pvc_root / "team-a" / "models" / "runs").symlink_to(pvc_root / "team-a" / "models" / "elsewhere")
    digest = write_stage(a, "teacher")
    assert read_artifact(a, "teacher").digest == digest


@pytest.mark.parametrize("uri", ["{root}/team-a/models/runs", "{root}/team-a/models/../models/runs", "{root}"])
def test_a_plain_path_into_the_operators_claim_mounts_is_refused(pvc_root, uri):
    """The Ray-cluster backend takes plain paths; one that names another namespace's mounted claim
    directly would skip the namespace check pvc:// gets."""
    (pvc_root / "team-a" / "models").mkdir(parents=True)
    a = job_in("team-a", evaluated=True)
    evaluated_in(a)
    b = job_in("team-b")
    with pytest.raises(ReconcileBlocked) as blocked:
        operator_dir(b, uri.format(root=pvc_root))
    assert blocked.value.reason == ARTIFACT_STORE_UNAVAILABLE and "pvc://CLAIM/PATH" in str(blocked.value)


def test_a_plain_path_elsewhere_is_read_as_before(pvc_root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("shared-runs")
    assert operator_dir(job_in("team-b"), str(elsewhere / "runs")) == (elsewhere / "runs").resolve()
