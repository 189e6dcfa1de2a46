"""The typed MedDistillJob spec: valid examples pass, every invalid spec is refused at the right field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meddistill.spec.crd import build_crd, render_crd_yaml
from meddistill.spec.load import SpecValidationError, load_job, load_jobs
from meddistill.spec.models import MedDistillJobSpec, pipeline_stages

ROOT = Path(__file__).resolve().parent.parent
INVALID = sorted((ROOT / "tests" / "invalid_specs").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _expected_path(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect-error-at: "), f"{path} must start with its expected error path"
    return first.removeprefix("# expect-error-at: ").strip()


def test_there_are_at_least_25_distinct_invalid_specs():
    assert len(INVALID) >= 25
    assert len({p.read_text() for p in INVALID}) == len(INVALID)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_spec_is_rejected_naming_the_field(path: Path):
    with pytest.raises(SpecValidationError) as info:
        load_jobs(path)
    paths = [e.path for e in info.value.errors]
    assert _expected_path(path) in paths, f"errors were: {info.value}"
    for err in info.value.errors:
        assert str(path) in err.source and len(err.message) > 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_valid(path: Path):
    for job in load_jobs(path):
        assert job.kind == "MedDistillJob"


def test_validate_cli_exit_codes_and_messages():
    good = subprocess.run([sys.executable, "-m", "meddistill.cli", "validate", *map(str, EXAMPLES)],
                          capture_output=True, text=True, cwd=ROOT / "tests")
    assert good.returncode == 0, good.stderr
    assert f"{len(EXAMPLES)} valid, 0 invalid" in good.stdout
    bad = subprocess.run([sys.executable, "-m", "meddistill.cli", "validate", str(ROOT / "examples/quickstart.yaml"),
                          str(ROOT / "tests/invalid_specs/min-above-max-replicas.yaml")],
                         capture_output=True, text=True, cwd=ROOT / "tests")
    assert bad.returncode == 1
    assert "spec.serving.minReplicas: got 3; minReplicas must be <= maxReplicas" in bad.stderr
    assert "1 valid, 1 invalid" in bad.stderr


def test_several_documents_per_file_report_each_one(tmp_path: Path):
    docs = [yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text()) for _ in range(3)]
    docs[1]["spec"]["quantization"]["method"] = "nf3"
    docs[2]["spec"]["serving"]["engine"] = "tgi"
    f = tmp_path / "many.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(SpecValidationError) as info:
        load_jobs(f)
    sources = {e.source for e in info.value.errors}
    assert sources == {f"{f}#1", f"{f}#2"}
    assert any("allowed values: 'nf4', 'fp4', 'int8' or 'none'" in e.message for e in info.value.errors)


def test_unknown_field_suggests_the_near_miss(tmp_path: Path):
    doc = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    doc["spec"]["distillation"]["temprature"] = 3.0
    f = tmp_path / "typo.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecValidationError, match="Did you mean 'temperature'"):
        load_job(f)


def test_yaml_syntax_error_names_the_line(tmp_path: Path):
    f = tmp_path / "broken.yaml"
    f.write_text("apiVersion: meddistill.io/v1alpha1\nkind: [MedDistillJob\n")
    with pytest.raises(SpecValidationError, match=r"broken.yaml:\d+: \(yaml\): not valid YAML"):
        load_jobs(f)


def test_defaults_fill_in_and_stages_follow_the_cache_mode():
    spec = MedDistillJobSpec.model_validate(
        {"teacher": {"model": "m", "datasets": ["jsonl:x.jsonl"]}, "student": {"derive": {"keepLayers": 2}},
         "evaluation": {"datasets": ["jsonl:y.jsonl"]}}
    )
    assert spec.student.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert spec.quantization.method == "nf4" and spec.quantization.double_quant
    assert spec.serving.target_ongoing_requests < 1e9  # always explicit, so autoscaling can scale up
    assert pipeline_stages(spec) == ["teacher", "distill-data", "distill", "quantize", "evaluate"]
    spec.distillation.teacher_cache = "online"
    assert pipeline_stages(spec) == ["teacher", "distill", "quantize", "evaluate"]


def _walk(node, path=""):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.get("properties", {}).items():
            yield from _walk(v, f"{path}.{k}")
        if "items" in node:
            yield from _walk(node["items"], f"{path}[]")


def test_crd_schema_is_structural_and_documented():
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema["properties"]["spec"], "spec"):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert "type" in node, f"{path} has no type (not structural)"
        if not path.endswith("[]"):  # list items are explained by their list
            assert node.get("description"), f"{path} has no description for kubectl explain"
    lora = schema["properties"]["spec"]["properties"]["student"]["properties"]["lora"]
    assert lora["properties"]["targetModules"]["default"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "q, k, v, o" in lora["properties"]["targetModules"]["description"]
    rules = schema["properties"]["spec"]["properties"]["serving"]["x-kubernetes-validations"]
    assert {"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must be <= maxReplicas",
            "fieldPath": ".minReplicas"} in rules
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Stage", "Accuracy", "Age"]
    assert version["subresources"] == {"status": {}}
    status = schema["properties"]["status"]["properties"]
    for field in ("phase", "currentStage", "conditions", "stages", "results", "serving", "observedGeneration"):
        assert field in status


def test_chart_crd_is_exactly_the_generated_one():
    chart_crd = ROOT / "charts/meddistill-operator/crds/meddistilljobs.yaml"
    assert chart_crd.read_text() == render_crd_yaml(), (
        "the chart's CRD drifted from the spec models: run "
        "`meddistill crd > charts/meddistill-operator/crds/meddistilljobs.yaml`"
    )


def test_spec_reference_doc_is_generated_from_the_models():
    from meddistill.spec.reference import render_spec_reference

    doc = ROOT / "docs/spec-reference.md"
    assert doc.read_text() == render_spec_reference(), (
        "docs/spec-reference.md drifted: run `meddistill crd --reference > docs/spec-reference.md`"
    )
    assert "| `targetModules` |" in doc.read_text()
    # Constrained strings read as their type, not as pydantic's repr of the constraint (the CRD carries those).
    assert "annotation=" not in doc.read_text() and "| `datasets` | list[str] | required |" in doc.read_text()
