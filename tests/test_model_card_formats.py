"""The model card's per-format entries from a quantize manifest as the stage records it, without running a
pipeline: which format serving loads on each hardware, the files each format owns, and manifests made
before quantization.formats. (The real stages write and read these in tests/test_gguf_stage_and_engine.py.)"""
from __future__ import annotations

import importlib.util

import pytest

from meddistill.jobs.model_card import format_entries, quantization_lines
from meddistill.jobs.stage import StageContext
from meddistill.lineage import tree_digest
from meddistill.spec.models import MedDistillJob

ROOT_FILES = {"config.json": "a" * 64, "model.safetensors": "b" * 64, "tokenizer.json": "c" * 64}
W4A16_FILES = {"w4a16/config.json": "d" * 64, "w4a16/model.safetensors": "e" * 64}
RESULTS = {"rows": [
    {"model": "quantized", "dataset": "jsonl:e.jsonl", "scoring": "generative", "accuracy": 0.5, "n": 10, "weightBytes": 7},
    {"model": "w4a16", "dataset": "jsonl:e.jsonl", "scoring": "generative", "accuracy": 0.6, "n": 10, "weightBytes": 8},
    {"model": "w4a16", "dataset": "jsonl:e.jsonl [loglik]", "scoring": "loglik", "accuracy": 0.7, "n": 10},
    {"model": "w4a16", "dataset": "jsonl:open.jsonl", "scoring": "generative", "accuracy": 0.0, "n": 0},  # open questions
]}


def context(gpus: int, formats: list[str] | None) -> StageContext:
    spec = {"teacher": {"model": "builtin:smollm2-135m-instruct", "datasets": ["jsonl:t.jsonl"]},
            "student": {"model": "builtin:smollm2-135m-instruct"}, "evaluation": {"datasets": ["jsonl:e.jsonl"]},
            "quantization": {"formats": formats}, "serving": {"gpusPerReplica": gpus}, "artifacts": {"uri": "/runs"}}
    return StageContext(MedDistillJob.model_validate({"apiVersion": "meddistill.io/v1alpha1", "kind": "MedDistillJob",
                                                      "metadata": {"name": "j"}, "spec": spec}))


def manifest(formats: list[str] | None) -> dict:
    metrics = {"weight_bytes_after": 100, "w4a16_method": "gptq", "w4a16_file_bytes": 90}
    files = dict(ROOT_FILES)
    if formats:
        metrics["formats"] = formats
        files.update(W4A16_FILES if "w4a16" in formats else {})
    return {"config": {"method": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}, "metrics": metrics,
            "files": files, "digest": "f" * 64}


@pytest.fixture
def vllm_installed(monkeypatch):
    """find_spec says vllm imports (it does not here), as in a GPU serving image."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))


def test_gpu_with_vllm_serves_w4a16_and_each_format_owns_its_files(vllm_installed):
    ctx = context(1, ["nf4", "w4a16"])
    nf4, w4a16 = format_entries(ctx, manifest(["nf4", "w4a16"]), RESULTS)
    assert (nf4["served"], w4a16["served"], w4a16["engine"]) == (False, True, "vllm")
    assert nf4["files"] == ROOT_FILES and nf4["digest"] == tree_digest(ROOT_FILES) and nf4["weight_bytes"] == 100
    assert w4a16["files"] == W4A16_FILES and w4a16["location"] == f"{ctx.uri('quantize')}/w4a16"
    assert w4a16["weight_bytes"] == 90 and "group size 128" in w4a16["what"] and "gptq" in w4a16["what"]
    assert [(r["dataset"], r["accuracy"]) for r in w4a16["evaluation"]] == [
        ("jsonl:e.jsonl", 0.6), ("jsonl:e.jsonl [loglik]", 0.7), ("jsonl:open.jsonl", 0.0)]
    line = next(row for row in quantization_lines([nf4, w4a16]) if row.startswith("| w4a16 |"))
    assert "0.60 (n=10)" in line and "0.70" not in line and line.endswith("| yes (vllm engine) |")  # generative only
    assert "n=0" not in line  # an open-question set has no accuracy to show


def test_w4a16_alone_without_vllm_is_not_served_and_the_card_says_why():
    entries = format_entries(context(1, ["w4a16"]), manifest(["w4a16"]), RESULTS)
    assert not any(e["served"] for e in entries)
    assert "install vllm" in entries[0]["not_served_because"]
    assert any(row.startswith("Not served:") and "install vllm" in row for row in quantization_lines(entries))


def test_a_manifest_from_before_formats_is_one_nf4_entry_with_every_file():
    [nf4] = format_entries(context(0, None), manifest(None), RESULTS)
    assert nf4["format"] == "nf4" and nf4["served"] and nf4["engine"] == "transformers"
    assert nf4["files"] == ROOT_FILES and [r["accuracy"] for r in nf4["evaluation"]] == [0.5]
