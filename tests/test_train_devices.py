"""Every training recipe feeds its model batches on the device the worker reports, on a CPU-only CI.

The recipe's device function (train_common.worker_device) is made to report the `meta` device,
where no batch is by default. A forward pre-hook on the model (the teacher's DeepSpeed module, the
distill student, the online teacher) then checks every tensor argument is on `meta` and raises a
sentinel to stop before any compute. The test expects the sentinel: a missing `.to(device)` shows
up as the hook's assertion (a cpu tensor), not as the sentinel.
"""
from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.usefixtures("ray_local")
SENTINEL = "SENTINEL-reached-forward-on-the-reported-device"


def _check_devices(module, args, kwargs):
    import torch

    reported = torch.device("meta")
    tensors = {k: v for k, v in [*enumerate(args), *kwargs.items()] if torch.is_tensor(v)}
    assert tensors, "the model was called without tensors"
    wrong = {k: str(v.device) for k, v in tensors.items() if v.device != reported}
    assert not wrong, f"tensors not on the reported device {reported}: {wrong}"
    raise RuntimeError(SENTINEL)


def _checked(recipe_module: str, builder: str, loop: str, check_params: bool):
    """A Ray Train loop: the recipe's loop with the device reported as meta and the hook on the
    model that `builder` returns."""
    def run(config):
        import importlib

        import torch

        from meddistill.jobs import train_common

        recipe = importlib.import_module(recipe_module)
        train_common.worker_device = lambda engine=None: torch.device("meta")
        build = getattr(recipe, builder)

        def hooked(*args, **kwargs):
            built = build(*args, **kwargs)
            model = built[0] if isinstance(built, tuple) else built
            if check_params:  # the model itself was put on the reported device too
                assert {p.device.type for p in model.parameters()} == {"meta"}, f"{builder}: parameters not on meta"
            model.register_forward_pre_hook(_check_devices, with_kwargs=True)
            return built

        setattr(recipe, builder, hooked)
        getattr(recipe, loop)(config)

    return run


def _examples(n: int = 4) -> list[dict]:
    ids = list(range(10, 22))
    return [{"input_ids": ids, "labels": [-100] * 6 + ids[6:]} for _ in range(n)]


def _fit_expecting_sentinel(loop, config: dict, resources, tmp_path) -> None:
    from ray import cloudpickle  # what Ray pickles tasks with (its own copy of cloudpickle)
    from ray.train import FailureConfig, RunConfig

    from meddistill.jobs import train_common

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    run_config = RunConfig(storage_path=str(tmp_path / "ray_train"), name="devices", failure_config=FailureConfig(max_failures=0))
    with pytest.raises(Exception) as err:
        train_common.fit(loop, config, _examples(), resources, run_config)
    text = "".join(str(e) for e in _chain(err.value))
    assert "not on the reported device" not in text, text[-3000:]
    assert SENTINEL in text, text[-3000:]


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_teacher_batches_reach_the_deepspeed_engine_on_its_device(tiny_job, tmp_path):
    teacher = tiny_job().spec.teacher  # full fine-tune, ZeRO-3, fp32
    config = {"teacher": teacher.model_dump(), "total_steps": 1, "out_dir": str(tmp_path), "crash_after": None}
    loop = _checked("meddistill.jobs.teacher", "build_model", "train_loop", check_params=False)
    _fit_expecting_sentinel(loop, config, teacher.resources, tmp_path)


def _distill_config(job, tiny_model_dir, tmp_path, online: bool) -> dict:
    import shutil

    from meddistill.artifacts import write_manifest

    spec = job.spec
    teacher = tmp_path / "teacher"  # a teacher artifact: the worker fetches it by URI (a local store: in place)
    shutil.copytree(tiny_model_dir, teacher / "model")
    write_manifest(teacher, stage="teacher", config={})
    return {"student": spec.student.model_dump(), "distillation": spec.distillation.model_dump(),
            "base": str(tiny_model_dir), "base_uri": None, "adapter_base": str(tiny_model_dir),
            "teacher_uri": str(teacher), "online": online,
            "total_steps": 1, "out_dir": str(tmp_path), "crash_after": None}


def test_distill_student_gets_batches_on_its_device(tiny_job, tiny_model_dir, tmp_path):
    job = tiny_job(distillation={"mode": "sequence"})  # student-only loss: no cached teacher rows needed
    loop = _checked("meddistill.jobs.distill", "build_student", "distill_loop", check_params=True)
    _fit_expecting_sentinel(loop, _distill_config(job, tiny_model_dir, tmp_path, False), job.spec.student.resources, tmp_path)


def test_distill_online_teacher_lives_and_gets_batches_on_the_students_device(tiny_job, tiny_model_dir, tmp_path):
    job = tiny_job(distillation={"mode": "logits", "teacherCache": "online"})
    loop = _checked("meddistill.jobs.distill", "load_online_teacher", "distill_loop", check_params=True)
    _fit_expecting_sentinel(loop, _distill_config(job, tiny_model_dir, tmp_path, True), job.spec.student.resources, tmp_path)


def test_one_rank_per_gpu_so_no_gpu_of_a_worker_idles():
    """DeepSpeed and DDP drive one device per process: 4 workers of 8 GPUs are 32 one-GPU ranks."""
    from meddistill.jobs import train_common
    from meddistill.spec.models import Resources

    gpu = train_common.scaling_config(Resources(workers=4, gpus_per_worker=8, cpus_per_worker=64))
    assert gpu.num_workers == train_common.ranks(Resources(workers=4, gpus_per_worker=8)) == 32
    assert gpu.use_gpu and gpu.resources_per_worker == {"CPU": 8, "GPU": 1}
    cpu = train_common.scaling_config(Resources(workers=2, cpus_per_worker=3))
    assert cpu.num_workers == 2 and not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 3, "GPU": 0}


def test_student_base_loads_in_its_training_precision_with_fp32_adapters(tiny_job, tiny_model_dir):
    import torch

    from meddistill.jobs.distill import build_student

    student = tiny_job(student={"training": {"precision": "bf16", "gradientCheckpointing": True}}).spec.student
    model, _ = build_student(str(tiny_model_dir), student.training, student.lora, torch.device("cpu"), "bf16")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    assert model.base_model.model.is_gradient_checkpointing  # spec.student.training.gradientCheckpointing
    # and a backward pass through the checkpointed, frozen bf16 base still reaches the adapters
    ids = torch.arange(10, 20).unsqueeze(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fp16_falls_back_to_fp32_on_cpu_and_says_so(caplog):
    import torch

    from meddistill.jobs import train_common

    assert train_common.runnable_precision("bf16", torch.device("cpu"), "spec.student.training.precision") == "bf16"
    assert train_common.runnable_precision("fp16", torch.device("cuda", 0), "spec.student.training.precision") == "fp16"
    assert train_common.runnable_precision("fp16", torch.device("cpu"), "spec.student.training.precision") == "fp32"
    assert "spec.student.training.precision=fp16 cannot train on CPU" in caplog.text
