"""Models and datasets on a PersistentVolumeClaim (`pvc://CLAIM/PATH`), the way air-gapped hospitals keep them.

Resolution is `$MEDDISTILL_PVC_ROOT/CLAIM/PATH` everywhere (here a temp dir stands in for the pods'
/mnt/pvc); the KubeRay backend mounts each claim the job reads read-only at exactly that place in every
stage and serving pod; a malformed reference is refused when the spec is loaded, by `validate` and by
the CRD's patterns alike.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest
import yaml

from meddistill import artifacts
from meddistill.artifacts import PARENT_SEGMENT, PARENT_SEGMENT_CEL
from meddistill.data.loaders import load_dataset
from meddistill.data.refs import DATASET_REF_PATTERN, SAMPLES_DIR, DatasetRefError, parse_dataset_ref
from meddistill.modelsource import ModelSourceError, load_model, resolve_model_source
from meddistill.operator.backends import kuberay_objects as kuberay
from meddistill.operator.planner import Serve, StartStage
from meddistill.spec.load import validate_document
from meddistill.spec.models import MedDistillJob, Teacher, input_claims, pipeline_stages
from tests.test_serve_model_source import tiny_model

REPO = Path(__file__).resolve().parents[1]
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@pytest.fixture
def pvc_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "pvc"
    monkeypatch.setenv(artifacts.PVC_ROOT_ENV, str(root))  # what the operator sets in every pod
    return root


# --- resolution -------------------------------------------------------------------------------------


def test_a_model_on_a_claim_loads_from_the_pvc_root(pvc_root):
    stored = tiny_model(pvc_root / "models" / "students" / "tiny")
    assert resolve_model_source("pvc://models/students/tiny") == stored
    model, tokenizer = load_model("pvc://models/students/tiny")
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token == "<pad>"


def test_datasets_on_a_claim_load_through_the_real_loaders(pvc_root):
    shutil.copytree(SAMPLES_DIR / "pubmedqa", pvc_root / "data" / "pubmedqa")
    shutil.copy(SAMPLES_DIR / "medquad_qa" / "medquad.heldout200.jsonl", pvc_root / "data" / "medquad.jsonl")

    medquad = load_dataset("jsonl:pvc://data/medquad.jsonl")
    assert len(medquad) == 200 and medquad.records == load_dataset(
        "jsonl:@samples/medquad_qa/medquad.heldout200.jsonl").records
    test = load_dataset("pubmedqa:pvc://data/pubmedqa/ori_pqal.json#test")  # the split file beside it is found too
    assert len(test) == 500 and {r.answer for r in test} <= {"yes", "no", "maybe"}
    assert parse_dataset_ref("hf:pvc://data/saved#test").is_hub_name is False  # a saved folder, never the Hub


def test_a_missing_path_names_the_reference_the_resolved_path_and_the_fix(pvc_root):
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source("pvc://models/llama-3-8b")
    msg = str(err.value)
    assert "'pvc://models/llama-3-8b'" in msg and str(pvc_root / "models" / "llama-3-8b") in msg
    assert f"must be mounted at {pvc_root / 'models'}" in msg and artifacts.PVC_ROOT_ENV in msg

    with pytest.raises(FileNotFoundError) as err:
        load_dataset("jsonl:pvc://data/medquad.jsonl")
    msg = str(err.value)
    assert "jsonl:pvc://data/medquad.jsonl" in msg and str(pvc_root / "data" / "medquad.jsonl") in msg
    assert f"must be mounted at {pvc_root / 'data'}" in msg and artifacts.PVC_ROOT_ENV in msg

    (pvc_root / "data").mkdir(parents=True)  # the claim is mounted; the file is not on it
    with pytest.raises(FileNotFoundError, match=r"the claim 'data' is mounted at .* holds no 'medquad.jsonl'"):
        load_dataset("jsonl:pvc://data/medquad.jsonl")


# --- validation -------------------------------------------------------------------------------------


def _quickstart(**spec) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["namespace"] = "ward"
    doc["spec"].update(spec)
    return doc


@pytest.mark.parametrize("where,value,fix", [
    ("teacher.model", "pvc://models", "no path inside the claim 'models'; write pvc://CLAIM/PATH, e.g. pvc://models/"),
    ("teacher.model", "pvc:///llama", "the claim '' is not a PersistentVolumeClaim name"),
    ("student.model", "pvc://Hospital_Models/s1", "the claim 'Hospital_Models' is not a PersistentVolumeClaim name"),
    ("teacher.datasets", "jsonl:pvc://data/", "no path inside the claim 'data'"),
    ("evaluation.datasets", "pubmedqa:pvc://data-#test", "the claim 'data-' is not a PersistentVolumeClaim name"),
])
def test_a_bad_pvc_reference_is_refused_when_the_spec_is_loaded(where, value, fix):
    doc = _quickstart()
    section, field = where.split(".")
    if section == "student":
        doc["spec"]["student"] = {"model": value}
    else:
        doc["spec"][section][field] = [value] if field == "datasets" else value
    job, errors = validate_document(doc, "job.yaml")
    assert job is None
    assert [e.path for e in errors] == [f"spec.{where}"]
    assert fix in errors[0].message, errors[0].message


def _model_accepted(text: str) -> bool:
    try:
        Teacher(model=text, datasets=["jsonl:x.jsonl"])
    except ValueError:
        return False
    return True


def _ref_accepted(text: str) -> bool:
    try:
        parse_dataset_ref(text)
    except DatasetRefError:
        return False
    return True


def test_the_crd_patterns_refuse_exactly_the_pvc_references_validate_refuses():
    """The API server (RE2, same patterns) must refuse what `validate` refuses, no more, for pvc:// inputs."""
    model_pattern = MedDistillJob.model_json_schema(by_alias=True)["$defs"]["Teacher"]["properties"]["model"]["pattern"]
    pieces = ["pvc://", "pvc:/", "pvc:", "p", "models", "a.b", "A", "-", ".", "/", "/", "x.jsonl", " ", "#", "test"]
    rng = random.Random(1)
    tails = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 5))) for _ in range(4000)]
    models = [rng.choice(["", " ", "pvc://", "pvc://models"]) + t for t in tails]
    refs = [rng.choice(["jsonl:", "pubmedqa:", "hf: "]) + rng.choice(["", "pvc://"]) + t for t in tails]
    # The CRD's CEL rule beside each pattern refuses a '..' segment (artifacts.PARENT_SEGMENT_CEL).
    assert PARENT_SEGMENT_CEL == "!self.matches('" + PARENT_SEGMENT.replace("\\", "\\\\") + "')"
    no_parent = lambda v: not re.search(PARENT_SEGMENT, v)  # noqa: E731
    assert [m for m in models if _model_accepted(m) != bool(m and re.fullmatch(model_pattern, m) and no_parent(m))] == []  # minLength 1
    assert [r for r in refs if _ref_accepted(r) != bool(re.fullmatch(DATASET_REF_PATTERN, r) and no_parent(r))] == []
    assert 500 < sum(map(_ref_accepted, refs)) < 3500 and 500 < sum(map(_model_accepted, models)) < 3500


# --- the KubeRay backend's pods ---------------------------------------------------------------------


def hospital_job() -> MedDistillJob:
    """Artifacts on `models`, which also holds the teacher; the student and data on claims of their own."""
    return MedDistillJob.model_validate(_quickstart(
        teacher={**_quickstart()["spec"]["teacher"], "model": "pvc://models/smollm2-135m",
                 "datasets": ["jsonl:pvc://data/medquad.jsonl", "pubmedqa:@samples/pubmedqa/ori_pqal.json#train"]},
        student={"model": "pvc://student-weights.radiology.hospital-long-name-for-claims/s1"},
        evaluation={"datasets": ["pubmedqa:pvc://data/pubmedqa/ori_pqal.json#test", " jsonl: pvc://eval-sets/general.jsonl"]},
        artifacts={"uri": "pvc://models/runs"}))


def test_input_claims_are_the_claims_the_job_reads():
    claims = ["data", "eval-sets", "models", "student-weights.radiology.hospital-long-name-for-claims"]
    assert input_claims(hospital_job().spec) == claims
    assert input_claims(MedDistillJob.model_validate(_quickstart()).spec) == []  # builtin model, shipped samples


def _pod_specs(body: dict) -> dict[str, dict]:
    cluster = body["spec"].get("rayClusterSpec") or body["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            "worker": cluster["workerGroupSpecs"][0]["template"]["spec"]}


def test_every_stage_and_serving_pod_mounts_the_input_claims_read_only(monkeypatch):
    job = hospital_job()
    refs = [job.spec.teacher.model, job.spec.student.model,
            *(parse_dataset_ref(r).path for r in (*job.spec.teacher.datasets, *job.spec.evaluation.datasets))]
    refs = [r.strip() for r in refs if r.strip().startswith("pvc://")]
    bodies = [kuberay.rayjob(job, "uid", StartStage(s, 1, f"quickstart-{s}-a1")) for s in pipeline_stages(job.spec)]
    bodies.append(kuberay.rayservice(job, "uid", Serve("quickstart", "pvc://models/runs/ward/quickstart/quantize")))
    for body in bodies:
        assert "volumes" not in body["spec"].get("submitterPodTemplate", {}).get("spec", {})  # runs no stage code
        for role, pod in _pod_specs(body).items():
            where = f"{body['kind']} {body['metadata']['name']} {role}"
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert len(volumes) == len(pod["volumes"]), where  # no duplicate volumes
            assert all(DNS_LABEL.fullmatch(n) and len(n) <= 63 for n in volumes), where
            claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert sorted(claims) == input_claims(job.spec), where  # `models` once, though both store and input
            container = pod["containers"][0]
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert len(mounts) == len(container["volumeMounts"]), where
            by_claim = {c: mounts[v["name"]] for c, v in claims.items()}
            for claim, mount in by_claim.items():
                assert mount["mountPath"] == f"{kuberay.PVC_ROOT}/{claim}", where
                read_only = claim != "models"  # the artifact claim stays writable
                assert mount.get("readOnly", False) is read_only, where
                assert claims[claim]["persistentVolumeClaim"].get("readOnly", False) is read_only, where
            assert claims["models"]["name"] == "artifacts"
            # The pod's MEDDISTILL_PVC_ROOT makes every reference resolve inside one of these mounts.
            env = {e["name"]: e.get("value") for e in container["env"]}
            monkeypatch.setenv(artifacts.PVC_ROOT_ENV, env[artifacts.PVC_ROOT_ENV])
            for ref in refs:
                path = artifacts.pvc_path(ref)
                assert any(path.is_relative_to(m["mountPath"]) for m in by_claim.values()), (where, ref)


def test_a_job_without_pvc_inputs_mounts_only_its_store():
    job = MedDistillJob.model_validate(_quickstart(artifacts={"uri": "pvc://runs/x"}))
    pods = _pod_specs(kuberay.rayjob(job, "uid", StartStage("teacher", 1, "quickstart-teacher-a1")))
    for pod in pods.values():
        assert [v["name"] for v in pod["volumes"]] == [kuberay.SHM_VOLUME, "artifacts"]
        assert all("readOnly" not in m for m in pod["containers"][0]["volumeMounts"])
