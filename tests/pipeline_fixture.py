"""Pytest plugin for pipeline tests: tiny jobs for unit speed, and the one real quickstart run.

    pytest_plugins = ["tests.pipeline_fixture"]      (in tests/conftest.py)

Fixtures
  tiny_model_dir   a 2-layer random Llama with SmolLM2's real tokenizer, saved once per session
  tiny_data_dir    small labelled medical QA files (yes/no/maybe + multiple choice), jsonl
  tiny_job         factory: a MedDistillJob over both, artifacts in a temp dir, overrides merged
  tiny_pipeline    the tiny job through every stage, once per session (a teacher worker killed once):
                   (StageContext, {stage: StageResult}); its data is private, so a test may change a byte
  quickstart_run   the artifact root (<tmp>/runs/quickstart) of the session's one real quickstart
                   pipeline run (tests/e2e_fixture.py). Minutes: marked slow users.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest


_FACTS = [
    ("Does aspirin reduce the risk of myocardial infarction in secondary prevention?", "yes"),
    ("Is vitamin C an effective treatment for acute myeloid leukemia?", "no"),
    ("Does moderate coffee intake change the risk of atrial fibrillation?", "maybe"),
    ("Do statins lower low-density lipoprotein cholesterol?", "yes"),
    ("Is penicillin effective against viral upper respiratory infections?", "no"),
    ("Does regular exercise improve insulin sensitivity in type 2 diabetes?", "yes"),
]
_MCQ = [
    ("Which vitamin deficiency causes scurvy?", {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D", "D": "Vitamin K"}, "B"),
    ("Which organ produces insulin?", {"A": "Liver", "B": "Kidney", "C": "Pancreas", "D": "Spleen"}, "C"),
    ("Which drug reverses opioid overdose?", {"A": "Naloxone", "B": "Atropine", "C": "Flumazenil", "D": "Digoxin"}, "A"),
    ("Which electrolyte disturbance causes peaked T waves?", {"A": "Hyponatremia", "B": "Hypokalemia", "C": "Hypercalcemia", "D": "Hyperkalemia"}, "D"),
]


def write_tiny_data(folder: Path, copies: int = 4) -> dict[str, str]:
    """train.jsonl (labelled, repeated with ids) and eval.jsonl; returns dataset refs."""
    folder.mkdir(parents=True, exist_ok=True)
    train, evals = [], []
    for c in range(copies):
        for i, (q, a) in enumerate(_FACTS):
            train.append({"id": f"ynm-{c}-{i}", "question": f"{q} (cohort {c})", "context": f"In cohort {c} of study {i} we measured outcomes.",
                          "answer": a, "question_type": "yes_no_maybe"})
        for i, (q, opts, a) in enumerate(_MCQ):
            train.append({"id": f"mcq-{c}-{i}", "question": f"{q} (set {c})", "options": opts, "answer": a, "question_type": "multiple_choice"})
    for i, (q, a) in enumerate(_FACTS):
        evals.append({"id": f"eval-{i}", "question": q, "context": "Held-out abstract.", "answer": a, "question_type": "yes_no_maybe"})
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in evals) + "\n")
    return {"train": f"jsonl:{folder / 'train.jsonl'}", "eval": f"jsonl:{folder / 'eval.jsonl'}"}


def write_tiny_model(target: Path, layers: int = 2) -> Path:
    """A random LlamaForCausalLM with SmolLM2's tokenizer (real vocab, real chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meddistill.modelsource import load_tokenizer

    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def tiny_job_document(model: str, refs: dict[str, str], artifacts: str, name: str = "tiny", **overrides) -> dict:
    """A small MedDistillJob document; `overrides` are merged into spec (nested dicts merge)."""
    spec = {
        "teacher": {
            "model": model, "datasets": [refs["train"]], "method": "full", "deepspeed": {"zeroStage": 3},
            "training": {"maxSteps": 4, "batchSize": 4, "maxSeqLength": 192, "learningRate": 1e-3,
                         "precision": "fp32", "checkpointEverySteps": 2, "warmupRatio": 0.0},
        },
        "student": {
            "derive": {"keepLayers": 1},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"maxSteps": 4, "batchSize": 4, "maxSeqLength": 192, "learningRate": 1e-3,
                         "precision": "fp32", "checkpointEverySteps": 2, "warmupRatio": 0.0},
        },
        "distillation": {"mode": "logits", "temperature": 2.0, "alpha": 0.5, "topK": 8, "maxNewTokens": 16},
        "quantization": {"method": "nf4", "computeDtype": "float32"},
        "evaluation": {"datasets": [refs["eval"]], "limit": 6, "batchSize": 6, "maxNewTokens": 4},
        "serving": {"enabled": False},
        "artifacts": {"uri": artifacts},
    }
    _merge(spec, overrides)
    return {"apiVersion": "meddistill.io/v1alpha1", "kind": "MedDistillJob", "metadata": {"name": name}, "spec": spec}


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_data_refs(tmp_path_factory) -> dict[str, str]:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_job(tiny_model_dir, tiny_data_refs, tmp_path):
    """Factory: tiny_job(**overrides) -> MedDistillJob with artifacts under tmp_path/runs."""
    from meddistill.spec.models import MedDistillJob

    def make(name: str = "tiny", **overrides):
        doc = tiny_job_document(str(tiny_model_dir), tiny_data_refs, str(tmp_path / "runs"), name, **overrides)
        return MedDistillJob.model_validate(doc)

    return make


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the in-process stage tests (2 CPUs, as CI has). Its workers get their own
    MEDDISTILL_CACHE (workers_cache), so an s3:// stage stages files in a temp folder, not in
    ~/.cache/meddistill/s3."""
    import ray

    if not ray.is_initialized():
        _LOCAL_RAY["cache"] = workers_cache(tmp_path_factory.mktemp("ray-workers-cache"))
        _start_local_ray(_LOCAL_RAY["cache"])
    yield
    _LOCAL_RAY.clear()
    ray.shutdown()


_LOCAL_RAY: dict = {}  # the session's ray_local settings, while it is in use


def _start_local_ray(cache: Path) -> None:
    import os

    import ray

    previous = os.environ.get("MEDDISTILL_CACHE")
    os.environ["MEDDISTILL_CACHE"] = str(cache)  # the raylet started here passes it to every worker
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never attach to a running head
    finally:  # the driver keeps its own cache (tests point it elsewhere with monkeypatch)
        if previous is None:
            del os.environ["MEDDISTILL_CACHE"]
        else:
            os.environ["MEDDISTILL_CACHE"] = previous


def restore_local_ray() -> None:
    """For a test that had to replace the session's Ray with its own cluster: start ray_local's again
    (same settings), so later tests never run on an implicitly started or joined Ray."""
    import ray

    if _LOCAL_RAY and not ray.is_initialized():
        _start_local_ray(_LOCAL_RAY["cache"])


def workers_cache(folder: Path) -> Path:
    """A fresh cache that shares the machine's converted builtin models (`models/`, `gguf/`:
    content-addressed, so safe to share, and a minute to rebuild) but nothing URL-keyed."""
    import os

    machine = Path(os.environ.get("MEDDISTILL_CACHE") or Path.home() / ".cache" / "meddistill").expanduser()
    for shared in ("models", "gguf"):
        (machine / shared).mkdir(parents=True, exist_ok=True)
        (folder / shared).symlink_to(machine / shared, target_is_directory=True)
    return folder


TINY_CRASH_STEP = 2  # tiny_pipeline's teacher rank 0 dies once after checkpointing this step


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir, tmp_path_factory, ray_local):
    """Run every stage of the tiny job once per session; shared by the stage tests
    (tests/test_jobs_pipeline.py), the model card's and the lineage check's."""
    import os

    from meddistill.jobs import train_common
    from meddistill.jobs.stage import StageContext, run_stage
    from meddistill.spec.models import MedDistillJob

    root = tmp_path_factory.mktemp("pipeline")
    refs = write_tiny_data(root / "data")  # not tiny_data_refs: tests here may tamper with these files
    job = MedDistillJob.model_validate(tiny_job_document(str(tiny_model_dir), refs, str(root / "runs")))
    ctx = StageContext(job)
    results = {}
    os.environ[train_common.CRASH_ENV] = str(TINY_CRASH_STEP)
    try:
        results["teacher"] = run_stage(ctx, "teacher")
    finally:
        del os.environ[train_common.CRASH_ENV]
    for stage in ("distill-data", "distill", "quantize", "evaluate"):
        results[stage] = run_stage(ctx, stage)
    return ctx, results


@pytest.fixture(scope="session")
def quickstart_run(quickstart_e2e) -> Path:
    """The artifact root of the session's one real quickstart pipeline.

    CI runs the full pipeline once: the end-to-end fixture (tests/e2e_fixture.py) drives it through
    the operator on a real Ray head, and every stage there is the same entrypoint `meddistill run`
    calls (`python -m meddistill.jobs STAGE`), writing the same layout. `meddistill run` itself is
    covered end to end on a tiny job by tests/test_run_resume.py.
    """
    return quickstart_e2e.artifact_root


def write_distill_artifact(ctx, base_model, target_modules: list[str]) -> None:
    """A verified distill artifact: a LoRA adapter on `base_model` with non-zero B, so merging changes the weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from meddistill.artifacts import write_manifest

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    out = ctx.output_dir("distill")
    model.save_pretrained(out / "adapter")
    write_manifest(out, stage="distill", config={})
