"""bench/gpu_pipeline.sh, the device check of issue 11: it parses, and its --dry-run derives a spec the
pipeline accepts (one GPU per worker, bf16, ZeRO-3, serving on one GPU) without running anything."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from meddistill.spec.models import MedDistillJob

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_pipeline.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_prints_a_gpu_spec_and_the_commands_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    env = {"OUT": str(out), "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spec = MedDistillJob.model_validate(yaml.safe_load((out / "gpu-quickstart.yaml").read_text())).spec
    for role in (spec.teacher, spec.student):
        assert role.resources.gpus_per_worker == 1 and role.training.precision == "bf16"
    assert spec.teacher.deepspeed.zero_stage == 3 and spec.serving.enabled and spec.serving.gpus_per_replica == 1
    assert spec.artifacts.uri == str(out / "runs")
    for command in ("meddistill.cli run", "--no-serve", "meddistill.cli serve", "/v1/chat/completions",
                    "/v1/medical/answer", "nvidia-smi", "evaluate/results.md"):
        assert command in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu-quickstart.yaml"]  # nothing ran, nothing else written
    assert "pip install" not in "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.startswith("#"))
