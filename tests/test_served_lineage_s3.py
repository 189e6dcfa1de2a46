"""The operator's pre-serving lineage check on an s3:// store (operator/served_lineage.py), against
moto's S3 server: it compares manifests only (never downloads weights), and refuses weights that
were re-published after the evaluate stage evaluated them."""
from __future__ import annotations

import os

import yaml

from meddistill import artifacts
from meddistill.operator import served_lineage
from meddistill.operator.planner import Observed
from meddistill.spec.models import MedDistillJob
from tests.support.kube_cluster import REPO_ROOT
from tests.test_artifacts_s3 import bucket, s3_endpoint  # noqa: F401 - fixtures

WEIGHTS = "model.safetensors"


def job_on(uri: str) -> MedDistillJob:
    doc = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["artifacts"] = {"uri": uri}
    doc["status"] = {"stages": [{"name": "evaluate", "state": "Succeeded", "artifactDigest": "x"}]}
    return MedDistillJob.model_validate(doc)


def publish(uri: str, stage: str, src, files: dict[str, bytes], inputs: dict[str, str]) -> str:
    d = src / stage
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    digest = artifacts.write_manifest(d, stage=stage, config={}, inputs=inputs).digest
    artifacts.ArtifactStore(artifacts.stage_uri(uri, "quickstart", stage)).publish(d)
    return digest


def test_manifests_only_and_a_republished_quantize_is_refused(bucket, tmp_path):  # noqa: F811
    uri = f"s3://{bucket}/runs"
    quantized = publish(uri, "quantize", tmp_path / "v1", {WEIGHTS: os.urandom(4096)}, {})
    publish(uri, "evaluate", tmp_path / "v1", {"results.json": b"{}", "README.md": b"# card\n"}, {"quantize": quantized})

    ok = served_lineage.check(job_on(uri), Observed())
    assert ok.verified is None and not ok.problems and "replica re-hashes" in ok.note
    assert ok.model_card == f"{uri}/quickstart/evaluate/README.md"
    cached = tmp_path / "cache-1" / "s3" / bucket / "runs" / "quickstart" / "quantize"  # MEDDISTILL_CACHE (fixture)
    assert (cached / "manifest.json").is_file() and not (cached / WEIGHTS).exists()  # never the weights

    publish(uri, "quantize", tmp_path / "v2", {WEIGHTS: os.urandom(4096)}, {})  # new weights, evaluate not re-run
    refused = served_lineage.check(job_on(uri), Observed())
    assert refused.verified is False
    assert refused.problems[0].startswith("input quantize: quantize/manifest.json is sha256")
