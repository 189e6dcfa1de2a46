"""Inference stages put their inputs where their model is, and decide that place in one function.

A CPU-only CI cannot see a missing `.to(device)`: the model and the inputs are both on the CPU.
So the model is put on the `meta` device (or the device decision is patched to return `meta`),
and a guard on its forward (and on `generate`, whose own bookkeeping cannot run on meta tensors)
checks that every tensor it receives is on the model's input device (the positions to keep, on the CPU),
then stops the run with a sentinel exception. A test passes only when the sentinel arrives: a CPU tensor
reaching the model fails the guard's assertion instead.

The device decision itself: the CPU branch runs for real; the GPU branches get the observed GPU
count, free memory and bf16 support as arguments.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meddistill.data import load_dataset
from meddistill.jobs import devices
from meddistill.jobs.devices import StageDevice, checkpoint_weight_bytes, stage_device
from meddistill.modelsource import input_device, load_model

GIB = 2**30
META = StageDevice("meta", "float32", None)


class ReachedTheModel(Exception):
    """Raised by the guard once the inputs reached the model on the right device."""


def guard_inputs(model) -> None:
    """Make the model's forward and generate assert their tensor inputs' device, then stop."""
    expected = input_device(model)

    def check(args, kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        assert tensors, "the model got no tensor inputs"
        # logits_to_keep indexes the final hidden states, which sit on the last GPU of a model split over
        # several (not on the input's): positions on the CPU index a tensor on any device.
        wrong = sorted({f"{name}: {t.device}" for name, t in zip([*map(str, range(len(args))), *kwargs], (*args, *kwargs.values()))
                        if torch.is_tensor(t) and t.device != (torch.device("cpu") if name == "logits_to_keep" else expected)})
        assert not wrong, f"inputs not on the model's input device {expected}: {wrong}"
        raise ReachedTheModel

    model.register_forward_pre_hook(lambda module, args, kwargs: check(args, kwargs), with_kwargs=True)
    model.generate = lambda *args, **kwargs: check(args, kwargs)


# ------------------------------------------------------------------ the decision


def test_no_reserved_gpu_runs_on_cpu_in_fp32():
    assert stage_device("evaluate", 0, 10 * GIB) == StageDevice("cpu", "float32", None)
    # GPUs visible but none reserved: the task must not take a GPU Ray gave someone else.
    assert stage_device("evaluate", 0, 10 * GIB, visible_gpus=8, free_bytes=80 * GIB, bf16_supported=True).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_reserved_gpus_that_torch_cannot_see_fall_back_to_cpu(caplog):
    assert stage_device("distill-data", 1, 10 * GIB) == StageDevice("cpu", "float32", None)
    assert "reserved but torch sees none" in caplog.text


def test_a_model_that_fits_one_gpu_goes_there_in_bf16():
    choice = stage_device("evaluate", 1, 15 * GIB, visible_gpus=1, free_bytes=139 * GIB, bf16_supported=True)
    assert choice == StageDevice("cuda:0", "bfloat16", None) and choice.on_gpu


def test_a_model_larger_than_one_gpu_is_spread_with_device_map_auto():
    # The 70B teacher at 16 bits (~141 GB) over 8 x 80 GB GPUs.
    choice = stage_device("distill-data", 8, 141 * 10**9, visible_gpus=8, free_bytes=79 * GIB, bf16_supported=True)
    assert choice == StageDevice("cuda:0", "bfloat16", "auto")
    # Headroom: weights that only just fit leave nothing for activations and the KV cache.
    assert stage_device("e", 1, 78 * GIB, visible_gpus=1, free_bytes=79 * GIB, bf16_supported=True).device_map == "auto"


def test_a_gpu_without_bf16_gets_fp16():
    assert stage_device("quantize", 1, GIB, visible_gpus=1, free_bytes=15 * GIB, bf16_supported=False).dtype == "float16"


def test_checkpoint_weight_bytes_reads_the_headers_at_the_load_dtype(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_model_dir))
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once, as saved
    assert checkpoint_weight_bytes(str(tiny_model_dir)) == 2 * params
    assert checkpoint_weight_bytes(str(tiny_model_dir), float_bytes=4) == 4 * params
    # An adapter directory counts its base model too.
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    adapter_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert checkpoint_weight_bytes(str(tmp_path / "adapter")) == 2 * (params + adapter_params)


def test_load_model_honours_the_decisions_device_map(monkeypatch, tiny_model_dir, tiny_data_refs):
    """device_map="auto" reaches from_pretrained (accelerate's placement; on this CPU machine all on
    cpu) and the model evaluates from there."""
    from transformers import AutoModelForCausalLM

    from meddistill.evaluation import evaluate

    real, seen = AutoModelForCausalLM.from_pretrained, []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    model, tokenizer = load_model(str(tiny_model_dir), **StageDevice("cpu", "bfloat16", "auto").load_kwargs())
    assert seen[0]["device_map"] == "auto" and seen[0]["dtype"] == torch.bfloat16
    assert input_device(model).type == "cpu" and next(model.parameters()).dtype == torch.bfloat16
    result = evaluate(model, tokenizer, _records(tiny_data_refs)[:2], batch_size=2, max_new_tokens=2,
                      latency_questions=0, warmup=False, progress=False)
    assert result.n == 2 and result.peak_cuda_bytes is None and result.device == "cpu"


# ------------------------------------------------------------------ inputs reach the model's device


@pytest.fixture
def meta_model(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    model.to("meta")
    guard_inputs(model)
    return model, tokenizer


def _records(tiny_data_refs, key="eval"):
    return load_dataset(tiny_data_refs[key]).records


@pytest.mark.parametrize("warmup", [True, False])  # the warm-up and the timed batches feed inputs the same way
def test_generative_evaluation_feeds_the_models_device(meta_model, tiny_data_refs, warmup):
    from meddistill.evaluation import evaluate

    model, tokenizer = meta_model
    with pytest.raises(ReachedTheModel):
        evaluate(model, tokenizer, _records(tiny_data_refs), batch_size=2, max_new_tokens=2, warmup=warmup, progress=False)


def test_loglik_evaluation_feeds_the_models_device(meta_model, tiny_data_refs):
    from meddistill.evaluation import evaluate

    model, tokenizer = meta_model
    with pytest.raises(ReachedTheModel):
        evaluate(model, tokenizer, _records(tiny_data_refs), batch_size=2, scoring="loglik", progress=False)


def test_batch1_latency_feeds_the_models_device(meta_model):
    from meddistill.evaluation.latency import batch1_latency

    model, tokenizer = meta_model
    with pytest.raises(ReachedTheModel):
        batch1_latency(model, tokenizer, ["What causes scurvy?"], [2], add_special=True, stop=[tokenizer.eos_token_id])


@pytest.fixture
def decide_meta(monkeypatch):
    """Every stage's device decision answers `meta`: what the stages then load must follow it."""
    calls = []

    def decide(stage, gpus, weight_bytes, **_):
        calls.append((stage, gpus, weight_bytes))
        return META

    monkeypatch.setattr(devices, "stage_device", decide)
    return calls


@pytest.mark.parametrize("mode", ["logits", "cross-tokenizer", "sequence"])
def test_teacher_pass_of_distill_data_feeds_the_teachers_device(decide_meta, monkeypatch, tiny_job, tiny_model_dir,
                                                                tiny_data_refs, tmp_path, mode):
    import meddistill.modelsource as modelsource
    from meddistill.jobs.distill_data import teacher_shard

    real_load = modelsource.load_model

    def load_guarded(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        guard_inputs(model)
        return model, tokenizer

    monkeypatch.setattr(modelsource, "load_model", load_guarded)
    from meddistill.jobs import storage

    artifact = tmp_path / "teacher"  # the teacher artifact as fetch_input leaves it on the task's node
    artifact.mkdir()
    (artifact / "model").symlink_to(tiny_model_dir)
    monkeypatch.setattr(storage, "fetch_input", lambda uri, stage=None: artifact)
    spec = tiny_job(distillation={"mode": mode}, teacher={"resources": {"gpusPerWorker": 1}}).spec
    records = [r.to_dict() for r in _records(tiny_data_refs, "train")[:3]]
    (tmp_path / "out").mkdir()
    with pytest.raises(ReachedTheModel):
        teacher_shard(str(tmp_path / "out"), "s3://bucket/runs/tiny/teacher", records, spec.model_dump(), "shard-00000")
    (stage, gpus, weight_bytes), = decide_meta
    assert (stage, gpus) == ("distill-data", 1) and weight_bytes > 0


@pytest.mark.parametrize("kind", ["base", "quantized"])
def test_evaluation_loads_each_row_where_the_decision_says(decide_meta, tiny_model_dir, kind):
    from meddistill.jobs.evaluate import load_for_eval

    model, _, dtype = load_for_eval(kind, str(tiny_model_dir), "nf4", gpus=2)
    assert input_device(model).type == "meta" and dtype.endswith("float32")
    assert decide_meta == [(f"evaluate {kind}", 2, checkpoint_weight_bytes(str(tiny_model_dir)))]


def test_the_student_row_is_merged_where_the_decision_says(decide_meta, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from meddistill.jobs.evaluate import load_for_eval

    model, _ = load_model(str(tiny_model_dir))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    merged, _, _ = load_for_eval("student", str(tmp_path / "adapter"), "nf4", gpus=1)
    assert input_device(merged).type == "meta" and not hasattr(merged, "peft_config")
    assert Path(tmp_path / "adapter").is_dir() and decide_meta[0][:2] == ("evaluate student", 1)
