"""`build_app`'s arguments as one typed model, `ServeArgs`: what config.py renders, what app.py reads.

The same JSON is `serveConfigV2.applications[0].args` in a RayService and the app's args in a Ray
Serve deploy config, and the operator compares deployed configs to decide whether to redeploy: so
field names and order are those of the rendered YAML (a model dumps in declaration order), and
fields the render may leave out default to None and are dropped from the dump (`exclude_none`).
Unknown keys are refused (`extra="forbid"`): a typo in a hand-edited serveConfigV2 fails at
`build_app` with its path named, instead of being silently ignored.
Torch- and Ray-free: the operator imports it through config.py.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Not plain float: pydantic would make `num_cpus: 1` a `1.0`, and the rendered YAML must not change.
Number = Union[int, float]
Engine = Literal["auto", "transformers", "vllm", "llamacpp"]
Format = Literal["nf4", "gguf", "w4a16"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Args):
    """Ray Serve's autoscaling_config: the keys we render (config.autoscaling_config) and tests shorten."""

    min_replicas: int | None = None
    initial_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: Number | None = None
    upscale_delay_s: Number | None = None
    downscale_delay_s: Number | None = None
    metrics_interval_s: Number | None = None
    look_back_period_s: Number | None = None


class ActorOptions(_Args):
    """Ray Serve's ray_actor_options of a replica."""

    num_cpus: Number | None = None
    num_gpus: Number | None = None
    runtime_env: dict[str, Any] | None = None  # local.start hands a replica the bearer token through it


class Deployment(_Args):
    """Ray Serve deployment options (None: Serve's own default). Our deployment's, and vLLM's deployment_config."""

    autoscaling_config: Autoscaling | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    ray_actor_options: ActorOptions | None = None
    max_surge_percent: int | None = None

    @property
    def gpus(self) -> Number:
        """GPUs a replica reserves (Ray always gives a replica the GPUs it reserves)."""
        return (self.ray_actor_options.num_gpus if self.ray_actor_options else None) or 0


class ModelLoading(_Args):
    model_id: str
    model_source: str


class EngineKwargs(_Args):
    """The vLLM engine arguments we set (config.llm_config says why each)."""

    max_model_len: int
    max_num_seqs: int
    tensor_parallel_size: int
    quantization: str | None = None
    enable_log_requests: bool


class CallbackKwargs(_Args):
    subfolder: str  # the artifact's folder vLLM serves (w4a16/)


class CallbackConfig(_Args):
    callback_kwargs: CallbackKwargs


class LLMConfigArgs(_Args):
    """The `ray.serve.llm.LLMConfig` of the vLLM engine, as data (vllm_app adds our model-source callback)."""

    model_loading_config: ModelLoading
    engine_kwargs: EngineKwargs
    deployment_config: Deployment
    log_engine_metrics: bool = True
    callback_config: CallbackConfig | None = None


class ServeArgs(_Args):
    """Everything `build_app` needs; defaults are the app's when a key is left out of hand-written args."""

    engine: Engine = "auto"  # as the spec says; `auto` is decided by build_app where it runs
    model_source: str
    model_name: str
    max_batch_size: int = Field(16, ge=1)
    max_model_len: int = Field(2048, ge=1)
    num_threads: int | None = None  # torch / llama.cpp threads of a replica (None: the library's)
    prompt_style: Literal["plain", "r1"] = "plain"
    require_auth: bool = False  # the token then comes from the replica's env (config.TOKEN_ENV / TOKEN_FILE_ENV)
    log_prompts: bool = False
    chat_system_prompt: str = ""
    deployment: Deployment = Field(default_factory=Deployment)
    formats: list[Format] = Field(default_factory=lambda: ["nf4"])
    gguf_file: str | None = None  # where the llama.cpp engine finds the GGUF in the artifact
    stream_interval: int | None = Field(None, ge=1)  # tokens per streamed chunk after the first (None: 1, not rendered)
    llm_config: LLMConfigArgs | None = None  # rendered when replicas may end up on vLLM
    max_waiting: int | None = Field(None, ge=1)  # the engine's waiting queue (None: 4 x max_batch_size); never rendered

    @property
    def waiting_limit(self) -> int:
        return self.max_waiting or 4 * self.max_batch_size

    def rendered(self) -> dict:
        """The JSON form: what goes into serveConfigV2 and what `parse` reads back."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def parse(cls, args: "dict | ServeArgs") -> "ServeArgs":
        """Validated args; a bad or unknown key raises ValueError naming its path and the fix."""
        if isinstance(args, cls):
            return args
        try:
            return cls.model_validate(args)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'args'}: "
                                 + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                                 for e in err.errors())
            raise ValueError(f"serve app args: {problems}. Render the args with meddistill.serve.config.app_args "
                             f"(`meddistill serve JOB --print-serve-config`); the keys are ServeArgs' fields "
                             f"(meddistill/serve/args.py)") from None
