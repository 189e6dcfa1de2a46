"""The pruned student's base travels with the distill artifact, not as a driver path: it carries
its own manifest (reused only for the same teacher and settings), the adapter names it `../base`
(resolved beside the adapter wherever the artifact is fetched), and a node that fetched it does
not upload it again as its own output."""
from __future__ import annotations

import json
import shutil

from meddistill.jobs import storage
from meddistill.jobs.student import BASE_STAGE, materialize_student_base


def test_a_pruned_base_is_reused_only_for_the_same_settings(tiny_job, tiny_model_dir, tmp_path):
    from meddistill.artifacts import read_manifest
    from meddistill.jobs.stage import StageContext

    target = tmp_path / "distill" / "base"
    ctx = StageContext(tiny_job(student={"derive": {"keepLayers": 1}}))
    materialize_student_base(ctx, tiny_model_dir, target)
    made = read_manifest(target)
    assert made.stage == BASE_STAGE and made.config["derive"]["keepLayers"] == 1
    weights = target / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    materialize_student_base(ctx, tiny_model_dir, target)
    assert weights.stat().st_mtime_ns == mtime  # same teacher, same settings: not pruned again

    ctx = StageContext(tiny_job(student={"derive": {"keepLayers": 2, "strategy": "first"}}))
    materialize_student_base(ctx, tiny_model_dir, target)  # the spec changed: a stale base must not be reused
    assert json.loads((target / "config.json").read_text())["num_hidden_layers"] == 2
    assert read_manifest(target).config["derive"]["keepLayers"] == 2


def test_an_adapter_with_a_relative_base_loads_wherever_its_artifact_is(tiny_model_dir, tmp_path):
    from meddistill.jobs import devices
    from meddistill.jobs.distill import DERIVED_BASE
    from meddistill.jobs.lora import add_lora
    from meddistill.modelsource import load_model, load_tokenizer
    from meddistill.spec.models import Lora

    artifact = tmp_path / "driver" / "distill"
    shutil.copytree(tiny_model_dir, artifact / "base")
    model, _ = load_model(str(artifact / "base"))
    peft_model = add_lora(model, Lora(r=4, alpha=8))
    peft_model.peft_config["default"].base_model_name_or_path = DERIVED_BASE
    peft_model.save_pretrained(artifact / "adapter")

    elsewhere = tmp_path / "another-node" / "distill"  # the driver's folder is gone
    elsewhere.parent.mkdir()
    shutil.move(artifact, elsewhere)
    loaded, tokenizer = load_model(str(elsewhere / "adapter"))
    assert loaded.base_model.model.config.num_hidden_layers == 2 and tokenizer.pad_token is not None
    assert load_tokenizer(str(elsewhere / "adapter")).vocab_size == tokenizer.vocab_size
    assert devices.checkpoint_weight_bytes(str(elsewhere / "adapter")) > devices.checkpoint_weight_bytes(
        str(elsewhere / "base"))  # base + adapter

    config = json.loads((elsewhere / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(elsewhere / "base")  # an older artifact's absolute base
    (elsewhere / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    load_model(str(elsewhere / "adapter"))


def test_a_folder_fetched_onto_the_node_is_not_uploaded_as_its_output(tmp_path):
    from meddistill.artifacts import write_manifest

    out = tmp_path / "distill"
    (out / "base").mkdir(parents=True)
    (out / "base" / "model.safetensors").write_bytes(b"weights")
    write_manifest(out / "base", stage=BASE_STAGE, config={})
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    assert [p.relative_to(out).as_posix() for p in storage.node_output_files(out)] == [
        "adapter/adapter_model.safetensors"]


def test_on_a_local_store_workers_read_the_base_in_place(tmp_path):
    base = tmp_path / "distill" / "base"
    base.mkdir(parents=True)
    with storage.stage_scope(str(tmp_path / "distill")):
        assert storage.share_with_workers(base) == str(base)


def test_ray_local_workers_stage_files_outside_the_home_cache(ray_local):
    """An s3:// stage's workers write into their MEDDISTILL_CACHE: in tests, a temp folder (that
    still shares the converted builtin models), never ~/.cache/meddistill/s3."""
    import os
    from pathlib import Path

    import ray

    cache = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("MEDDISTILL_CACHE")).remote())
    assert cache and Path(cache) != Path.home() / ".cache" / "meddistill" and "pytest-of" in cache
    assert (Path(cache) / "models").is_symlink()
