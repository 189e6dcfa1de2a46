"""`meddistill verify`: the tiny pipeline's untouched run verifies; one changed byte anywhere in the
chain (served weights, a dataset, an upstream manifest) or a file slipped in does not, naming it.

Tampering happens on a copy of the run, except for the dataset file, which is the shared run's
private data (tests/pipeline_fixture.py) and is restored afterwards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from meddistill.cli import main
from meddistill.lineage import verify_job



@pytest.fixture(scope="module")
def job_dir(tiny_pipeline) -> Path:
    ctx, _ = tiny_pipeline
    return Path(ctx.uri("evaluate")).parent


@pytest.fixture
def copy(job_dir, tmp_path) -> Path:
    target = tmp_path / job_dir.name
    shutil.copytree(job_dir, target)
    return target


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def verify_cli(job_dir: Path, capsys) -> tuple[int, dict[str, str]]:
    """(exit code, {stage: its line})."""
    code = main(["verify", str(job_dir)])
    lines = capsys.readouterr().out.splitlines()
    return code, {line.split()[0]: line for line in lines if not line.startswith("lineage:")}


def test_untouched_run_verifies_every_stage_and_the_sources(job_dir, tiny_model_dir, capsys):
    code, lines = verify_cli(job_dir, capsys)
    assert code == 0, lines
    assert list(lines) == ["teacher", "distill-data", "distill", "quantize", "evaluate", "sources"]
    assert all(" OK " in line for line in lines.values())
    sources = next(c for c in verify_job(job_dir) if c.stage == "sources")
    assert sources.files == 2 + sum(1 for p in Path(tiny_model_dir).rglob("*") if p.is_file())  # 2 datasets + base model


def test_one_byte_of_the_quantized_weights_fails_naming_the_file(copy, capsys):
    flip_byte(copy / "quantize" / "model.safetensors")
    code, lines = verify_cli(copy, capsys)
    assert code == 1
    assert "MISMATCH" in lines["quantize"] and "quantize/model.safetensors: sha256" in lines["quantize"]
    assert " OK " in lines["teacher"] and " OK " in lines["evaluate"]  # the mismatch is pinned to one stage


def test_one_byte_of_a_dataset_fails_naming_the_file(tiny_pipeline, job_dir, capsys):
    ctx, _ = tiny_pipeline
    train = Path(ctx.spec.teacher.datasets[0].split(":", 1)[1])
    original = train.read_bytes()
    try:
        flip_byte(train, offset=original.index(b"aspirin"))
        code, lines = verify_cli(job_dir, capsys)
    finally:
        train.write_bytes(original)
    assert code == 1
    assert "MISMATCH" in lines["sources"] and f"{train} is sha256" in lines["sources"]
    assert all(" OK " in line for stage, line in lines.items() if stage != "sources")


def test_a_rebuilt_upstream_manifest_breaks_the_link_to_it(copy, capsys):
    manifest = copy / "distill" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["metrics"]["loss"] = data["metrics"]["loss"] + 1.0  # as if distill had been re-run
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True))
    code, lines = verify_cli(copy, capsys)
    assert code == 1
    assert " OK " in lines["distill"]  # its files still match it
    assert "input distill: distill/manifest.json is sha256" in lines["quantize"]
    assert "input distill" in lines["evaluate"]


def test_a_file_added_to_the_served_folder_fails(copy, capsys):
    (copy / "quantize" / "adapter_model.safetensors").write_bytes(b"not part of the run")
    code, lines = verify_cli(copy, capsys)
    assert code == 1 and "quantize/adapter_model.safetensors: not in the manifest" in lines["quantize"]


def test_a_missing_stage_that_others_were_built_from_fails(copy, capsys):
    shutil.rmtree(copy / "distill")
    code, lines = verify_cli(copy, capsys)
    assert code == 1 and "distill/manifest.json is missing" in lines["quantize"]
    assert "distill/: missing" in lines["distill"]


def test_no_job_dir_is_an_error_not_a_pass(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert main(["verify", str(tmp_path)]) == 2
    assert "no stage folders" in capsys.readouterr().err


def test_the_operators_check_before_serving_refuses_one_changed_byte_naming_the_file(tiny_pipeline, copy):
    """operator/served_lineage.py on the real run: what the planner reads before it creates a serving app."""
    from meddistill.operator import served_lineage
    from meddistill.operator.planner import Observed
    from meddistill.spec.models import MedDistillJob

    ctx, _ = tiny_pipeline
    doc = ctx.job.model_dump(by_alias=True, mode="json", exclude_none=True)
    doc["spec"]["artifacts"]["uri"] = str(copy.parent)
    doc["status"] = {"stages": [{"name": "evaluate", "state": "Succeeded", "artifactDigest": "x"}]}
    job = MedDistillJob.model_validate(doc)

    ok = served_lineage.check(job, Observed())
    assert ok.verified and not ok.problems and ok.model_card == f"{copy}/evaluate/README.md"
    flip_byte(copy / "quantize" / "model.safetensors")
    refused = served_lineage.check(job, Observed())  # the file's mtime moved: re-hashed, not the cached verdict
    assert refused.verified is False
    assert [p.split(":")[0] for p in refused.problems] == ["quantize/model.safetensors"]
