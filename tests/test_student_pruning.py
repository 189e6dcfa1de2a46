"""Deriving the student: layers are dropped by measured importance, not by position."""
from __future__ import annotations

import json

import pytest

from meddistill.jobs.student import block_influence, keep_layer_indices, materialize_student_base, prune_layers


def test_importance_keeps_the_highest_scores_in_order():
    scores = [0.9, 0.01, 0.5, 0.02, 0.7]
    assert keep_layer_indices(5, 3, "importance", scores) == [0, 2, 4]
    assert keep_layer_indices(5, 5, "importance", scores) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="one score per layer"):
        keep_layer_indices(5, 3, "importance", [0.1, 0.2])
    with pytest.raises(ValueError, match="keepLayers=6"):
        keep_layer_indices(5, 6, "importance", scores)


def test_a_layer_that_does_nothing_scores_zero_and_is_dropped(tmp_path):
    import torch

    from meddistill.modelsource import load_model
    from tests.pipeline_fixture import write_tiny_model

    model, tokenizer = load_model(str(write_tiny_model(tmp_path / "m", layers=4)), dtype="float32")
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, tokenizer, ["What is hypertension? High blood pressure.", "Is aspirin an NSAID? Yes."])
    assert scores[2] == pytest.approx(0.0, abs=1e-5)
    assert min(scores[i] for i in (0, 1, 3)) > 1e-3
    kept = keep_layer_indices(4, 3, "importance", scores)
    assert kept == [0, 1, 3]
    # Uniform spacing would have kept the useless layer and dropped a working one.
    assert 2 in keep_layer_indices(4, 3, "uniform")
    before = model(**tokenizer("What is hypertension?", return_tensors="pt")).logits
    after = prune_layers(model, kept)(**tokenizer("What is hypertension?", return_tensors="pt")).logits
    assert torch.allclose(before, after, atol=1e-4)  # dropping it changes nothing


def test_derived_base_records_its_scores(tiny_job, tiny_model_dir, tmp_path):
    from meddistill.jobs.stage import StageContext

    job = tiny_job(student={"derive": {"keepLayers": 1}})
    base = materialize_student_base(StageContext(job), tiny_model_dir, tmp_path / "base")
    info = json.loads((tmp_path / "base" / "layer_importance.json").read_text())
    assert info["strategy"] == "importance" and len(info["block_influence"]) == 2
    assert info["kept"] == [max(range(2), key=lambda i: info["block_influence"][i])]
    assert json.loads((tmp_path / "base" / "config.json").read_text())["num_hidden_layers"] == 1
    assert base == str(tmp_path / "base")
