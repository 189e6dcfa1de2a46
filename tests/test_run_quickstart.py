"""The whole quickstart (real SmolLM2-135M-Instruct teacher, pruned LoRA student, NF4, PubMedQA)
through `meddistill run --no-serve`, once per session (tests/pipeline_fixture.py: quickstart_run)."""
from __future__ import annotations

import json

import pytest

from meddistill.artifacts import verify
from meddistill.spec.models import Results

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(60 * 60)]  # may pay for the pipeline run


def test_quickstart_produces_every_stage_and_the_paper_table(quickstart_run):
    for stage in ("teacher", "distill-data", "distill", "quantize", "evaluate"):
        assert verify(quickstart_run / stage) is not None, f"{stage}: no verified manifest"
    results = Results.model_validate(json.loads((quickstart_run / "evaluate" / "results.json").read_text()))
    # One generative row per model on PubMedQA (the general-question rows are checked in test_e2e_ray).
    rows = {r.model: r for r in results.rows if r.dataset.startswith("pubmedqa:") and r.scoring == "generative"}
    assert set(rows) == {"base", "teacher", "student", "quantized"}
    assert all(r.n == 40 and r.latency_ms > 0 and r.peak_memory_bytes > 0 for r in rows.values())
    # 30 -> 28 layers in 16 bits, then NF4: each step makes the weights smaller
    assert rows["quantized"].weight_bytes < rows["student"].weight_bytes < rows["teacher"].weight_bytes
    assert results.memory_reduction_pct > 0 and results.teacher_vs_quantized.memory_reduction_pct > 50
    if results.accuracy_retention_pct is not None:  # None only when the student got nothing right
        assert results.retention_ci_low <= results.accuracy_retention_pct <= results.retention_ci_high
    else:
        assert rows["student"].accuracy == 0
    # the model actually answers in the trained format most of the time
    assert rows["teacher"].unparsed_rate < 0.5


def test_quickstart_student_is_trained_and_quantized(quickstart_run):
    teacher = verify(quickstart_run / "teacher")
    assert teacher.metrics["step"] == teacher.config["training"]["maxSteps"]
    distill = verify(quickstart_run / "distill")
    assert distill.metrics["kd"] > 0
    kept = json.loads((quickstart_run / "distill" / "base" / "layer_importance.json").read_text())
    assert kept["strategy"] == "importance" and len(kept["kept"]) == 28
    dropped = set(range(30)) - set(kept["kept"])  # the two layers that change the hidden state least
    assert max(kept["block_influence"][i] for i in dropped) <= min(kept["block_influence"][i] for i in kept["kept"])
    quantize = verify(quickstart_run / "quantize")
    assert quantize.metrics["weight_bytes_after"] < 0.6 * quantize.metrics["weight_bytes_before"]
