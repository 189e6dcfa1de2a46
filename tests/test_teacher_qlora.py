"""QLoRA teacher: trains LoRA on a 4-bit base, saves the adapter, and merges it into the base in
the base's own precision (not into the 4-bit copy), as a plain model later stages reload."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("ray_local")


def test_qlora_saves_the_adapter_and_a_merged_full_precision_model(tiny_job, tmp_path):
    import torch
    from ray.train import FailureConfig, RunConfig
    from safetensors.torch import load_file

    from meddistill.jobs import teacher as recipe
    from meddistill.jobs import train_common
    from meddistill.modelsource import load_model

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}
    teacher = tiny_job(teacher={"method": "qlora", "lora": lora, "training": {"learningRate": 1e-2}}).spec.teacher
    ids = list(range(10, 26))
    examples = [{"input_ids": ids, "labels": [-100] * 8 + ids[8:]} for _ in range(4)]
    config = {"teacher": teacher.model_dump(), "total_steps": 1, "out_dir": str(tmp_path), "crash_after": None}
    run_config = RunConfig(storage_path=str(tmp_path / "ray_train"), name="qlora", failure_config=FailureConfig(max_failures=0))
    train_common.fit(recipe.train_loop, config, examples, teacher.resources, run_config)

    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    merged, _ = load_model(str(tmp_path / "model"))
    base, _ = load_model(teacher.model)
    layer = "model.layers.0.self_attn.q_proj"
    a, b = adapter[f"base_model.model.{layer}.lora_A.weight"], adapter[f"base_model.model.{layer}.lora_B.weight"]
    assert b.abs().sum() > 0, "the adapter did not train"
    merged_w, base_w = merged.get_submodule(layer).weight, base.get_submodule(layer).weight
    assert merged_w.dtype == torch.float32 and type(merged.get_submodule(layer)) is torch.nn.Linear
    # The delta lands on the original fp32 weights; a merge into the 4-bit copy would carry NF4's rounding.
    assert torch.allclose(merged_w, base_w + (lora["alpha"] / lora["r"]) * b @ a, atol=1e-6)
