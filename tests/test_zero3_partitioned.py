"""The teacher under ZeRO-3 on 2 Ray Train workers: partitioned load, and a save equal to the model.

Each worker builds the model exactly as the recipe does (teacher.build_model with the recipe's
DeepSpeed config), records the parameter bytes it holds right after the load, trains one step so
the weights differ from the file, saves through the recipe (teacher.save_final_model), then gathers
every parameter itself and compares: full fine-tune -> the saved tensors; LoRA -> the saved
adapter and the merged weights (base + alpha/r * B @ A). Per-rank numbers come back as JSON files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("ray_local")


def _worker(config: dict) -> None:
    from meddistill.jobs import train_common as tc

    tc.worker_setup()  # DS_ACCELERATOR=cpu before deepspeed is imported
    import deepspeed
    import ray.train
    import torch
    from safetensors.torch import load_file

    from meddistill.jobs import teacher as recipe
    from meddistill.spec.models import Teacher

    teacher = Teacher.model_validate(config["teacher"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    precision = teacher.training.precision
    ds_config = recipe.deepspeed_config(teacher, world, precision)
    model, tokenizer = recipe.build_model(teacher, ds_config, precision, torch.device("cpu"))
    resident = tc.resident_parameter_bytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.arange(10, 26).reshape(2, 8)
    loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    engine.backward(loss)
    engine.step()

    out = Path(config["out_dir"])
    recipe.save_final_model(engine, teacher, tokenizer, out / "model", precision)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        gathered = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    report = {"rank": rank, "resident_bytes": resident, "mismatched": [], "compared": 0, "dtypes": []}
    if rank == 0:
        saved = {k: v for f in sorted((out / "model").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        expected = gathered if teacher.method == "full" else _merged(gathered, teacher.lora)
        report["dtypes"] = sorted({str(t.dtype) for t in saved.values()})
        for key, tensor in saved.items():
            report["compared"] += 1
            if key not in expected or not torch.allclose(tensor, expected[key].to(tensor.dtype), atol=1e-6):
                report["mismatched"].append(key)
        report["not_saved"] = sorted(set(expected) - set(saved) - {"lm_head.weight"})  # tied to the embeddings
        report["trained"] = not all(torch.equal(saved[k], v.to(saved[k].dtype)) for k, v in _file_weights(config["model_dir"]).items() if k in saved)
        if teacher.method != "full":
            adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
            lora_params = {k.replace(".default", ""): v for k, v in gathered.items() if "lora_" in k}
            report["adapter_equal"] = adapter.keys() == lora_params.keys() and all(torch.equal(adapter[k], lora_params[k]) for k in adapter)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    ray.train.report({"done": 1})


def _merged(gathered: dict, lora) -> dict:
    """Plain-model weights from a PEFT model's gathered parameters: W + alpha/r * B @ A."""
    prefix = "base_model.model."
    plain = {}
    for name, tensor in gathered.items():
        if "lora_" in name:
            continue
        key = name[len(prefix):].replace(".base_layer.", ".")
        if ".base_layer." in name:
            stem = name.replace(".base_layer.weight", "")
            tensor = tensor + (lora.alpha / lora.r) * gathered[f"{stem}.lora_B.default.weight"] @ gathered[f"{stem}.lora_A.default.weight"]
        plain[key] = tensor
    return plain


def _file_weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _full_model_bytes(model_dir: Path, dtype: str) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied tensors once


@pytest.mark.parametrize(("method", "precision"), [
    ("full", "fp32"),
    pytest.param("lora", "fp32", marks=pytest.mark.slow),  # ~30 s each on 2 busy cores
    pytest.param("full", "bf16", marks=pytest.mark.slow),
])
def test_zero3_loads_partitioned_and_saves_the_gathered_model(method, precision, tiny_job, tiny_model_dir, tmp_path):
    from ray import cloudpickle  # what Ray pickles tasks with (its own copy of cloudpickle)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    lora = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}} if method == "lora" else {}
    job = tiny_job(teacher={"method": method, "deepspeed": {"zeroStage": 3}, "training": {"precision": precision}, **lora})
    teacher = job.spec.teacher
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    TorchTrainer(
        _worker,
        train_loop_config={"teacher": teacher.model_dump(), "out_dir": str(tmp_path), "model_dir": str(tiny_model_dir)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_train"), name="zero3", failure_config=FailureConfig(max_failures=0)),
    ).fit()

    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    full = _full_model_bytes(tiny_model_dir, dtype)  # the whole model in the training precision
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"{method} {precision}: full model {full} B; held per rank after load {[r['resident_bytes'] for r in ranks]}")
    for r in ranks:  # today's whole-model load would hold 1.0 x on each rank
        assert r["resident_bytes"] <= 0.6 * full, f"rank {r['rank']} holds {r['resident_bytes']} of {full} bytes"
    saved = ranks[0]
    assert saved["compared"] > 0 and saved["mismatched"] == [] and saved["not_saved"] == [], saved
    assert saved["trained"], "the saved weights equal the initial file: the save missed the trained parameters"
    assert saved["dtypes"] == [f"torch.{dtype}"], f"saved in {saved['dtypes']}, trained in {precision}"
    if method == "lora":
        assert saved["adapter_equal"], "the saved adapter differs from the gathered LoRA parameters"
