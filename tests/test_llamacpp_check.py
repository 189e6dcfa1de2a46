"""A llama.cpp build that cannot run on this processor is a clear error, never a dead process.

The real check runs the real probe (a small GGUF quantized to Q4_0 and Q4_K_M, decoded in batches)
in a child process. A build that faults is simulated by a probe that dies with SIGILL, as a
-march=native build with ggml's AMX path does on an AMX Xeon (issue 21).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meddistill import llamacpp_check as check
from meddistill.serve import config

REPO = Path(__file__).resolve().parents[1]
SIGILL_PROBE = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "llamacpp-check"


def test_the_installed_build_decodes_here_checked_once_in_a_child(own_cache, monkeypatch):
    verdict = check.llamacpp_verdict()
    assert verdict == check.Verdict(True), verdict.reason
    assert len(list(own_cache.glob("*.json"))) == 1  # the verdict is cached ...
    monkeypatch.setattr(check.subprocess, "run", lambda *a, **k: pytest.fail("probe ran twice"))
    assert check.llamacpp_verdict().ok  # ... and read back, not probed again


def test_a_build_that_dies_with_sigill_is_refused_with_why_and_how_to_rebuild(own_cache, monkeypatch, tmp_path):
    monkeypatch.setenv(check.PROBE_ENV, SIGILL_PROBE)
    verdict = check.llamacpp_verdict()
    assert not verdict.ok
    assert "died with SIGILL (an illegal instruction)" in verdict.reason and "AMX" in verdict.reason
    assert "tools/install.sh" in verdict.reason and "nf4" in verdict.reason
    # Each place that would load llama.cpp raises instead of taking its process down.
    from meddistill.llamacpp_model import LlamaCppModel

    with pytest.raises(check.LlamaCppUnusable, match="SIGILL"):
        LlamaCppModel(tmp_path / "model.gguf")
    from meddistill.jobs.quantize_gguf import build_gguf

    with pytest.raises(check.LlamaCppUnusable, match="quantization.formats gguf needs llama.cpp.*SIGILL"):
        build_gguf(tmp_path / "merged", tmp_path / "gguf", "Q4_0")
    # Serving: auto leaves llama.cpp out where nf4 exists; engine llamacpp says why.
    llama = check.llamacpp_verdict()
    assert config.pick_engine("auto", gpu=False, vllm_installed=False, formats=("nf4", "gguf"),
                              llamacpp_installed=llama.ok, llamacpp_problem=llama.reason) == "transformers"
    with pytest.raises(ValueError, match="serving.engine llamacpp: llama.cpp .* SIGILL"):
        config.pick_engine("llamacpp", gpu=False, vllm_installed=False, formats=("nf4", "gguf"),
                           llamacpp_installed=llama.ok, llamacpp_problem=llama.reason)


def test_a_probe_that_crashes_otherwise_or_errors_is_named(own_cache, monkeypatch):
    monkeypatch.setenv(check.PROBE_ENV, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert "died with SIGSEGV (a crash)" in check.llamacpp_verdict().reason
    monkeypatch.setenv(check.PROBE_ENV, "raise SystemExit('ggml: unsupported op')")
    reason = check.llamacpp_verdict().reason
    assert "could not decode" in reason and "ggml: unsupported op" in reason


def test_meddistill_run_refuses_a_gguf_job_before_any_stage(tmp_path):
    """The quickstart with quantization.formats [gguf] and serving.engine llamacpp, on a machine
    whose llama.cpp faults: refused at once with the reason, not after 10 minutes of stages."""
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["quantization"]["formats"] = ["gguf"]
    doc["spec"]["serving"]["engine"] = "llamacpp"
    doc["spec"]["artifacts"]["uri"] = str(tmp_path / "runs")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "MEDDISTILL_CACHE": str(tmp_path / "cache"), check.PROBE_ENV: SIGILL_PROBE}
    res = subprocess.run([sys.executable, "-m", "meddistill.cli", "run", str(job), "--no-serve"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "quantization.formats gguf needs llama.cpp, which cannot run here" in out and "SIGILL" in out, out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("manifest.json"))
    assert "teacher" not in out.split("error:")[0]  # no stage started before the refusal
