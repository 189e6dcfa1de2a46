"""Serving settings as data: the spec's `serving` section rendered for Ray Serve, one pure function each.

The same `app_args()` dict (a dumped `args.ServeArgs`) feeds `meddistill.serve.app:build_app` locally
(`meddistill serve`), in a KubeRay RayService and on a Ray cluster (`render_serve_config_v2`), so local
and cluster serving cannot drift. What a pod needs (the token Secret's env entry, worker sizing) is
the KubeRay backend's (operator/backends/kuberay_objects.py); the app reads its token as auth.py says.
Torch-free and Ray-free at import time: the operator imports this module.

Autoscaling defaults (why both knobs are always explicit: Ray Serve LLM leaves
`max_ongoing_requests` at 1e9, so a replica never looks busy and never scales up):

    CPU, our engine (SmolLM2-135M / a 4-bit 1-3B student, 1-2 cores per replica):
        maxBatchSize 16, maxOngoingRequests 16, targetOngoingRequests 4-8.
        A decode step costs about the same for 1..16 rows, so batches up to 16 are nearly free;
        past that a CPU replica is compute bound and extra requests only add queueing delay.
    7B model on one GPU (vLLM, 4-bit or bf16 on an A10G/L4/A100):
        maxBatchSize 64 (vLLM max_num_seqs), maxOngoingRequests 64, targetOngoingRequests 32.
        vLLM's continuous batching stays efficient up to ~64 concurrent sequences of 2k tokens on
        24-80 GB; targeting half of that leaves headroom while the next replica starts (minutes).

The bounded queue in front of each replica is `max_queued_requests = 2 * maxOngoingRequests`
(then Ray Serve answers 503); inside the replica, our engine answers 429 when its own waiting
queue is full. Scaling delays: up after 10 s of load, down after 60 s idle.
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from meddistill.artifacts import job_dir, local_path, stage_uri
from meddistill.quantized_formats import GGUF_DIR, W4A16_DIR, gguf_file_name, requested_formats
from meddistill.serve.args import ServeArgs

IMPORT_PATH = "meddistill.serve.app:build_app"
MAX_SURGE_PERCENT = 100  # replacing a model: every new replica starts before an old one stops (docs/replacing-models.md)
APP_NAME = "meddistill"
from meddistill.serve.auth import TOKEN_ENV, TOKEN_FILE_ENV, TOKEN_SHA256_ENV  # noqa: E402,F401 - re-exported
DEPLOYMENT_NAME = "MedDistillServer"
UPSCALE_DELAY_S = 10.0
DOWNSCALE_DELAY_S = 60.0


def pick_engine(requested: str, *, gpu: bool, vllm_installed: bool, formats: tuple[str, ...] = ("nf4",),
                llamacpp_installed: bool = False, llamacpp_problem: str = "") -> str:
    """'vllm', 'llamacpp' or 'transformers' for a replica. auto: vLLM where the replica has a GPU and
    vllm imports (it serves w4a16, else nf4); llama.cpp on CPU where the job made the gguf format and
    llama.cpp runs here (`llamacpp_installed`: meddistill.llamacpp_check's verdict, whose reason is
    `llamacpp_problem`); else our transformers engine (which serves nf4).

    Decided where the app runs (`app.build_app`, on the cluster, with the serving image), never when
    the operator renders the config: the operator has neither the image's packages nor GPUs.
    """
    if requested == "llamacpp" and "gguf" not in formats:
        raise ValueError(f"serving.engine llamacpp serves the gguf format, but quantization.formats is {list(formats)}; "
                         f"add gguf to quantization.formats or set serving.engine auto")
    if requested == "vllm" and not {"nf4", "w4a16"} & set(formats):
        raise ValueError(f"serving.engine vllm serves the w4a16 or nf4 format, but quantization.formats is {list(formats)}; "
                         f"add w4a16 to quantization.formats or set serving.engine auto")
    if requested == "transformers" and "nf4" not in formats:
        raise ValueError(f"serving.engine transformers serves the nf4 format, but quantization.formats is {list(formats)}; "
                         f"add nf4 to quantization.formats or set serving.engine auto")
    cannot = llamacpp_problem or "llama-cpp-python is not installed"
    if requested == "llamacpp" and not llamacpp_installed:
        raise ValueError(f"serving.engine llamacpp: {cannot}")
    if requested != "auto":
        return requested
    if gpu and vllm_installed and {"nf4", "w4a16"} & set(formats):
        return "vllm"
    if gpu and "nf4" not in formats and "w4a16" in formats:
        raise ValueError(f"quantization.formats {list(formats)}: w4a16 is served by vLLM, which this replica's image "
                         f"lacks; install vllm in spec.image or add nf4 to quantization.formats")
    if not gpu and "gguf" in formats and llamacpp_installed:
        return "llamacpp"
    if not gpu and "gguf" in formats and "nf4" not in formats:  # nothing else to serve: refuse with the reason
        raise ValueError(f"quantization.formats {list(formats)}: the gguf format is served by llama.cpp, but {cannot}; "
                         f"add nf4 to quantization.formats")
    return "transformers"


def pick_engine_here(requested: str, *, gpu: bool, formats: tuple[str, ...]) -> str:
    """pick_engine with what this process's image has: whether vllm imports, and llama.cpp's verdict
    (meddistill.llamacpp_check: a child process once per machine, asked only where it could be chosen)."""
    import importlib.util

    from meddistill.llamacpp_check import llamacpp_verdict

    llama = llamacpp_verdict() if "gguf" in formats and not gpu else None
    return pick_engine(requested, gpu=gpu, vllm_installed=importlib.util.find_spec("vllm") is not None,
                       formats=tuple(formats), llamacpp_installed=bool(llama and llama.ok),
                       llamacpp_problem=llama.reason if llama else "")


def may_use_vllm(serving: Any) -> bool:
    """Whether replicas of these settings can end up on vLLM (so the LLMConfig must be rendered)."""
    return serving.engine == "vllm" or (serving.engine == "auto" and serving.gpus_per_replica > 0)


def model_uri_for(job: Any, base_dir: str | None = None) -> str:
    """Where the job's quantized student is: the quantize stage's artifact directory."""
    uri = stage_uri(job.spec.artifacts.uri, job_dir(job.metadata), "quantize")
    path = local_path(uri, base_dir)
    return str(path) if path is not None else uri


def autoscaling_config(serving: Any, overrides: dict | None = None) -> dict:
    """Ray Serve autoscaling_config with explicit target_ongoing_requests."""
    config = {
        "min_replicas": serving.min_replicas,
        "initial_replicas": serving.initial_replicas if serving.initial_replicas is not None else serving.min_replicas,
        "max_replicas": serving.max_replicas,
        "target_ongoing_requests": serving.target_ongoing_requests,
        "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": DOWNSCALE_DELAY_S,
    }
    config.update(overrides or {})
    return config


def deployment_options(serving: Any, overrides: dict | None = None) -> dict:
    """Options of our Ray Serve deployment: autoscaling, backpressure, resources."""
    overrides = dict(overrides or {})
    return {
        "autoscaling_config": autoscaling_config(serving, overrides.pop("autoscaling_config", None)),
        "max_ongoing_requests": serving.max_ongoing_requests,
        "max_queued_requests": 2 * serving.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": serving.cpus_per_replica, "num_gpus": serving.gpus_per_replica},
        # A new model (or any restart-level change) starts its replicas beside the old ones, which
        # answer until the new ones are ready (Serve's default, 0, stops the old replica first).
        "max_surge_percent": MAX_SURGE_PERCENT,
        **overrides,
    }


def llm_config(serving: Any, model_uri: str, quantization_method: str = "none", formats: list[str] | None = None) -> dict:
    """A `ray.serve.llm.LLMConfig` (as a dict) for the vLLM engine, from the same settings.

    With the w4a16 format vLLM serves that (its Marlin kernels: faster than bitsandbytes, which it
    dequantizes per matmul), from the artifact's w4a16/ folder (`vllm_app.ResolveModelSource`), and
    finds the scheme in its config.json's quantization_config, so `quantization` is left unset.
    """
    w4a16 = "w4a16" in (formats or [])
    engine_kwargs: dict[str, Any] = {
        "max_model_len": serving.max_model_len,
        "max_num_seqs": serving.max_batch_size,
        "tensor_parallel_size": max(1, serving.gpus_per_replica),
        # The nf4 format is a bitsandbytes checkpoint; vLLM loads it pre-quantized.
        "quantization": "bitsandbytes" if quantization_method != "none" and not w4a16 else None,
        # vLLM's request log holds the prompts: off unless serving.logPrompts (explicit, whatever
        # the installed Ray's default is).
        "enable_log_requests": bool(serving.log_prompts),
    }
    return {
        "model_loading_config": {"model_id": serving.model_name, "model_source": model_uri},
        "engine_kwargs": {k: v for k, v in engine_kwargs.items() if v is not None},
        "deployment_config": {
            "autoscaling_config": autoscaling_config(serving),
            "max_ongoing_requests": serving.max_ongoing_requests,
            "max_queued_requests": 2 * serving.max_ongoing_requests,
            "max_surge_percent": MAX_SURGE_PERCENT,
        },
        "log_engine_metrics": True,
        **({"callback_config": {"callback_kwargs": {"subfolder": W4A16_DIR}}} if w4a16 else {}),
    }


def chat_system_prompt(serving: Any) -> str:
    """The system message a chat without one gets: the spec's, else the open-question template's.

    The student was fine-tuned only under our templates' system prompts; under the base model's
    chat-template default ("You are a helpful AI assistant named SmolLM...") it answers worse.
    """
    if serving.chat_system_prompt is not None:
        return serving.chat_system_prompt
    from meddistill.prompts.render import get_template

    return get_template("open").system


def serving_args(serving: Any, model_uri: str, *, prompt_style: str = "plain", quantization_method: str = "none",
                 engine: str | None = None, overrides: dict | None = None, formats: list[str] | None = None,
                 gguf_type: str = "Q4_K_M") -> dict:
    """The JSON args of `build_app` (also `serveConfigV2.applications[0].args`): a dumped `ServeArgs`.

    `engine` stays as the spec says (`auto` is decided by `build_app` where it runs).
    `overrides` replaces deployment options (tests shorten autoscaling delays with it).
    `formats` are the quantize artifact's formats (quantized_formats.requested_formats); with gguf,
    `gguf_file` is where the llama.cpp engine finds it in the artifact.
    """
    engine = engine or serving.engine
    formats = list(formats or ["nf4"])
    may_vllm = engine == "vllm" or (engine == "auto" and may_use_vllm(serving))
    return ServeArgs(
        engine=engine,
        model_source=model_uri,
        model_name=serving.model_name,
        max_batch_size=serving.max_batch_size,
        max_model_len=serving.max_model_len,
        num_threads=serving.cpus_per_replica,
        prompt_style=prompt_style,
        require_auth=serving.auth is not None,
        log_prompts=serving.log_prompts,
        chat_system_prompt=chat_system_prompt(serving),
        deployment=deployment_options(serving, overrides),
        formats=formats,
        gguf_file=f"{GGUF_DIR}/{gguf_file_name(gguf_type)}" if "gguf" in formats else None,
        stream_interval=serving.stream_interval if serving.stream_interval > 1 else None,  # 1: args as before
        llm_config=llm_config(serving, model_uri, quantization_method, formats) if may_vllm else None,
    ).rendered()


def app_args(job: Any, model_uri: str | None = None, *, engine: str | None = None,
             overrides: dict | None = None) -> dict:
    """`serving_args` for a job: its serving section, eval prompt style and quantized student."""
    return serving_args(job.spec.serving, model_uri or model_uri_for(job), prompt_style=job.spec.evaluation.prompt_style,
                        quantization_method=job.spec.quantization.method, engine=engine, overrides=overrides,
                        formats=requested_formats(job.spec), gguf_type=job.spec.quantization.gguf_type)


def render_serve_config_v2(job: Any, model_uri: str | None = None, engine: str | None = None) -> str:
    """The RayService `serveConfigV2` YAML for a job (its quantized student unless `model_uri`)."""
    args = app_args(job, model_uri, engine=engine)
    options = args["deployment"]
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": copy.deepcopy(args),  # not shared with `deployments`: YAML would write &id anchors
            # Listed again so `kubectl get rayservice -o yaml` shows the limits; build_app applies
            # the same values, so the two never disagree. Only when our deployment surely exists:
            # Serve refuses overrides for a deployment the app does not have (vLLM's app).
            "deployments": [] if "llm_config" in args else [{"name": DEPLOYMENT_NAME, **options}],
        }],
    }
    return yaml.safe_dump(config, sort_keys=False)
