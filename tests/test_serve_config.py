"""Serving settings rendered from the spec: serveConfigV2, autoscaling, the vLLM LLMConfig, engine choice."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meddistill.serve import config
from meddistill.spec.load import load_job
from meddistill.spec.models import Serving

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def job():
    return load_job(ROOT / "examples" / "quickstart.yaml")


def test_config_module_is_torch_and_ray_free():
    code = ("import sys, meddistill.serve.config as c; "
            "bad = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_serve_config_v2_has_import_path_args_and_limits(job):
    job.spec.serving.max_ongoing_requests = 24
    job.spec.serving.target_ongoing_requests = 6
    rendered = yaml.safe_load(config.render_serve_config_v2(job, "/mnt/pvc/runs/quickstart/quantize"))
    app = rendered["applications"][0]
    assert app["import_path"] == "meddistill.serve.app:build_app"
    assert app["args"]["model_source"] == "/mnt/pvc/runs/quickstart/quantize"
    assert app["args"]["engine"] == "auto"  # decided where the app runs; no GPU per replica here, so
    assert "llm_config" not in app["args"]  # it can only become our transformers engine
    scaling = app["deployments"][0]["autoscaling_config"]
    assert scaling["target_ongoing_requests"] == 6 and scaling["min_replicas"] == 1 and scaling["max_replicas"] == 2
    assert app["deployments"][0]["max_ongoing_requests"] == 24
    assert app["deployments"][0]["max_queued_requests"] == 48
    assert app["args"]["deployment"] == {k: v for k, v in app["deployments"][0].items() if k != "name"}


def test_default_model_is_the_quantize_stage_dir(job):
    args = config.app_args(job)
    assert args["model_source"].endswith("runs/quickstart/quantize")


def test_autoscaling_always_explicit_and_overridable():
    scaling = config.autoscaling_config(Serving(min_replicas=0, max_replicas=5), {"upscale_delay_s": 1})
    assert scaling["target_ongoing_requests"] == 4 and scaling["upscale_delay_s"] == 1
    assert scaling["initial_replicas"] == 0


@pytest.mark.parametrize("engine,gpu,vllm,expected", [
    ("auto", False, True, "transformers"), ("auto", True, False, "transformers"), ("auto", True, True, "vllm"),
    ("auto", False, False, "transformers"), ("vllm", False, False, "vllm"), ("transformers", True, True, "transformers"),
])
def test_engine_is_picked_from_what_the_replica_has(engine, gpu, vllm, expected):
    assert config.pick_engine(engine, gpu=gpu, vllm_installed=vllm) == expected


def test_a_gpu_replica_keeps_auto_and_gets_both_engines_settings(job):
    job.spec.serving.gpus_per_replica = 1
    app = yaml.safe_load(config.render_serve_config_v2(job, "s3://models/quickstart/quantize"))["applications"][0]
    assert app["args"]["engine"] == "auto"  # not decided by the operator, which has no GPU and no vllm
    assert app["args"]["llm_config"]["model_loading_config"]["model_source"] == "s3://models/quickstart/quantize"
    assert app["args"]["deployment"]["ray_actor_options"]["num_gpus"] == 1  # what build_app reads as "has a GPU"
    assert app["deployments"] == []  # vLLM's app has no MedDistillServer deployment to override


@pytest.mark.parametrize("log_prompts", [False, True])
def test_vllm_request_logging_follows_log_prompts(job, log_prompts):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    job.spec.serving.gpus_per_replica, job.spec.serving.log_prompts = 1, log_prompts
    llm = LLMConfig(**config.app_args(job, "/m")["llm_config"])
    assert llm.engine_kwargs["enable_log_requests"] is log_prompts  # the key Ray Serve LLM's vLLM engine reads


def test_vllm_args_are_a_valid_ray_serve_llm_config(job):
    # ray.serve.llm itself refuses to import without vLLM; its pydantic LLMConfig model validates here.
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    job.spec.serving.gpus_per_replica = 1
    job.spec.serving.engine = "vllm"
    rendered = yaml.safe_load(config.render_serve_config_v2(job, "s3://models/quickstart/quantize"))
    llm = LLMConfig(**rendered["applications"][0]["args"]["llm_config"])
    assert llm.model_loading_config.model_id == "meddistill-student"
    assert llm.engine_kwargs["quantization"] == "bitsandbytes"
    assert llm.engine_kwargs["max_model_len"] == job.spec.serving.max_model_len
    deployment = llm.deployment_config
    assert deployment["max_ongoing_requests"] == job.spec.serving.max_ongoing_requests  # not Ray's 1e9 default
    assert deployment["autoscaling_config"]["target_ongoing_requests"] == job.spec.serving.target_ongoing_requests


def test_auth_comes_from_the_secret_as_env(job):
    # The app only reads TOKEN_ENV; the KubeRay backend brings the Secret's key there in every Serve pod.
    from meddistill.operator.backends.kuberay_objects import serving_token_env

    assert serving_token_env(job) == [] and config.app_args(job)["require_auth"] is False
    job.spec.serving.auth = {"secret_name": "student-token", "key": "tok"}
    job = type(job).model_validate(job.model_dump(by_alias=True))
    env = serving_token_env(job)
    assert env == [{"name": config.TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": "student-token", "key": "tok"}}}]
    assert config.app_args(job)["require_auth"] is True


def test_cli_prints_serve_config():
    done = subprocess.run([sys.executable, "-m", "meddistill.cli", "serve", "examples/quickstart.yaml",
                           "--print-serve-config"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["applications"][0]["import_path"] == config.IMPORT_PATH


def test_cli_serve_without_quantized_student_names_the_fix(tmp_path):
    job = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    job["spec"]["artifacts"]["uri"] = str(tmp_path)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, "-m", "meddistill.cli", "serve", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "meddistill run" in done.stderr and "--model" in done.stderr


def test_chats_without_a_system_message_get_the_template_the_student_was_trained_with(job):
    from meddistill.prompts.render import get_template
    from meddistill.serve.app import with_system_prompt

    trained = get_template("open").system
    assert config.app_args(job)["chat_system_prompt"] == trained
    user = [{"role": "user", "content": "What is hypertension?"}]
    assert with_system_prompt(user, trained) == [{"role": "system", "content": trained}, *user]
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert with_system_prompt(own, trained) == own  # the client's own system message wins
    job.spec.serving.chat_system_prompt = ""
    assert config.app_args(job)["chat_system_prompt"] == "" and with_system_prompt(user, "") == user


def test_stream_interval_reaches_the_app_args_only_when_set(job):
    from meddistill.serve.args import ServeArgs

    assert "stream_interval" not in config.app_args(job)  # the default leaves running apps' args as they were
    job.spec.serving.stream_interval = 4
    args = config.app_args(job)
    assert args["stream_interval"] == 4 and ServeArgs.parse(args).stream_interval == 4
    with pytest.raises(ValueError, match="stream_interval"):
        ServeArgs.parse({**args, "stream_interval": 0})
