"""The MedDistillJob API (meddistill.io/v1alpha1), written once.

These pydantic models are the single source of truth: the CLI validates files with them, the
jobs read their stage config from them, the operator plans from them, and the CRD schema in the
chart is generated from them (`meddistill crd`). Field descriptions become `kubectl explain` text.

Cross-field rules are declared once with `rule(...)`: the same rule is checked here in Python and
emitted as a CEL `x-kubernetes-validations` entry, so the API server refuses what `validate` refuses.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from meddistill.artifacts import (
    PARENT_SEGMENT_CEL,
    PVC_CLAIM_PATTERN,
    PVC_SCHEME,
    input_path_pattern,
    parent_segment_problem,
    pvc_claim,
    pvc_input_problem,
)
from meddistill.data.refs import DATASET_REF_PATTERN, parse_dataset_ref

API_GROUP = "meddistill.io"
API_VERSION = "v1alpha1"
KIND = "MedDistillJob"
PLURAL = "meddistilljobs"
SHORT_NAMES = ["mdj"]
STAGES = ("teacher", "distill-data", "distill", "quantize", "evaluate")
"""All pipeline stages in order; `pipeline_stages(spec)` gives the ones a job runs."""

KUBERAY_NAME_MAX = 47  # KubeRay refuses longer RayJob names (the RayCluster and Services it makes grow from them)
BACKOFF_LIMIT_MAX = 100  # runPolicy.backoffLimit's ceiling: the last attempt of a stage is a<BACKOFF_LIMIT_MAX + 1>


def stage_run_suffix(stage: str, attempt: int) -> str:
    """What a stage run's child name adds to the job's name: `<job>-<stage>-a<attempt>`."""
    return f"-{stage}-a{attempt}"


# The longest job name whose every child fits KubeRay's limit: the longest stage at the last attempt.
NAME_MAX = KUBERAY_NAME_MAX - max(len(stage_run_suffix(s, BACKOFF_LIMIT_MAX + 1)) for s in STAGES)
# A DNS label: child Services are named after the job, and a '.' (valid in a resource name) is not.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Rule:
    """A cross-field rule: a Python check and the equivalent CEL expression for the CRD."""

    def __init__(self, cel: str, message: str, check: Callable[[Any], bool], field: str | None = None):
        self.cel, self.message, self.check, self.field = cel, message, check, field

    def x_validation(self) -> dict:
        out = {"rule": self.cel, "message": self.message}
        if self.field:
            out["fieldPath"] = "." + self.field
        return out


def _cel(*rules: Rule) -> dict:
    return {"x-kubernetes-validations": [r.x_validation() for r in rules]}


class SpecModel(BaseModel):
    """Base: camelCase on the wire (Kubernetes style), unknown fields are errors, not silence."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=False
    )
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        for r in type(self).RULES:
            if not r.check(self):
                # The field travels in ctx so error reports can point at it (spec.serving.minReplicas).
                raise PydanticCustomError("cross_field", r.message, {"field": r.field or ""})
        return self


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


# The CRD's schema carries the reference pattern, so the API server refuses what the parser refuses;
# in Python the parser itself checks (its messages name the bad part and the fix).
# `..` is refused in every path and reference (artifacts.PARENT_SEGMENT), by CEL on the API server.
NO_PARENT_SEGMENT = {"x-kubernetes-validations": [{
    "rule": PARENT_SEGMENT_CEL,
    "message": "a '..' path segment is refused (it would climb out of the claim or folder named): name the place directly"}]}
PATH_MAX = 4096  # bounds the CEL check's cost on the API server
DatasetRefStr = Annotated[str, Field(max_length=PATH_MAX, json_schema_extra={"pattern": DATASET_REF_PATTERN, **NO_PARENT_SEGMENT})]


# A model source: anything the resolver takes, but a pvc:// one must name a claim and a path in it (the
# API server refuses what `_model_source` refuses; blank strings are left to the resolver as before).
ModelSourceStr = Annotated[str, Field(max_length=PATH_MAX, json_schema_extra={
    "pattern": rf"^(?:{input_path_pattern()}|\s*)$", **NO_PARENT_SEGMENT})]


# Names of the Kubernetes objects a job refers to (Secrets, ServiceAccounts, PriorityClasses, a Kueue
# LocalQueue) and its image: refused when the job is applied (here and by the API server), not when a
# child is created from them, which for serving is hours into a run. Names are DNS-1123 subdomains.
K8sName = Annotated[str, Field(min_length=1, max_length=253, pattern=rf"^{PVC_CLAIM_PATTERN}$")]
# A queue name is also a label value (kueue.x-k8s.io/queue-name): 63 characters at most.
QueueName = Annotated[str, Field(max_length=63, pattern=rf"^(?:{PVC_CLAIM_PATTERN})?$")]
# An OCI image reference, [REGISTRY[:PORT]/]PATH[:TAG][@DIGEST] (the distribution/reference grammar,
# without IPv6 registries); "" where the field is optional.
_REGISTRY = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (rf"^(?:(?:{_REGISTRY}/)?{_PATH_PART}(?:/{_PATH_PART})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
                 r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?)?$")
ImageRef = Annotated[str, Field(max_length=1024, pattern=IMAGE_PATTERN)]


def _no_parent_segment(value: str | None) -> str | None:
    if value and (problem := parent_segment_problem(value)):
        raise ValueError(problem)
    return value


# A plain path or URI field (artifacts.uri, nvmePath): `..` refused here and on the API server.
PathStr = Annotated[str, Field(max_length=PATH_MAX, json_schema_extra=NO_PARENT_SEGMENT), AfterValidator(_no_parent_segment)]


def _model_source(value: str | None) -> str | None:
    _no_parent_segment(value)
    text = (value or "").strip()
    if text.startswith(PVC_SCHEME) and (problem := pvc_input_problem(text)):
        raise ValueError(problem)
    return value


def _dataset_refs(value: list[str]) -> list[str]:
    # One reference form everywhere (`FORMAT:PATH[#SPLIT]`); the data package owns the parser.
    from meddistill.data.refs import parse_dataset_ref

    for i, ref in enumerate(value):
        try:
            parse_dataset_ref(ref)
        except ValueError as e:
            raise ValueError(f"[{i}] {e}") from None
    return value


class Resources(SpecModel):
    """Ray Train workers for a stage: how many, and what each one gets."""

    workers: int = Field(1, ge=1, le=512, description="Worker pods (nodes). Training runs one data-parallel rank per GPU (workers x gpusPerWorker), one per worker on CPU.")
    gpus_per_worker: int = Field(0, ge=0, le=16, description="GPUs per worker; 0 runs on CPU (gloo backend).")
    cpus_per_worker: int = Field(1, ge=1, le=256, description="CPUs per worker.")
    memory: str = Field(
        "8Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        description="Memory per worker pod, a Kubernetes quantity (e.g. 16Gi).",
    )


class Training(SpecModel):
    """Optimisation hyperparameters of a training stage."""

    epochs: float = Field(1.0, gt=0, le=100, description="Passes over the training data (fractions allowed).")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps; 0 = no limit beyond epochs.")
    learning_rate: float = Field(2e-5, gt=0, le=1, description="Peak learning rate (AdamW, linear warmup and decay).")
    batch_size: int = Field(4, ge=1, le=4096, description="Micro-batch size per worker.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(512, ge=16, le=131072, description="Tokens per training example (longer ones are truncated from the left of the prompt).")
    warmup_ratio: float = Field(0.05, ge=0, le=0.5, description="Fraction of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Training precision (weights loaded and computed in it; fp32 master weights for the optimizer); CPU runs use fp32 or bf16 (fp16 falls back to fp32 there).")
    checkpoint_every_steps: int = Field(50, ge=1, description="Report a checkpoint to Ray Train every N optimizer steps.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass instead of storing them (less memory, ~30% more compute); needed for 70B at long sequences.")
    max_samples: int = Field(0, ge=0, description="Use at most this many training records (0 = all).")
    seed: int = Field(42, description="Random seed (data order, LoRA init).")


class Lora(SpecModel):
    """PEFT LoRA adapters."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names that get adapters; default the attention projections q, k, v, o.",
    )


class DeepSpeed(SpecModel):
    """DeepSpeed ZeRO settings for the teacher fine-tune."""

    RULES = (
        Rule(
            "self.offloadParams == 'none' || self.zeroStage == 3",
            "offloadParams needs zeroStage 3 (only ZeRO-3 partitions parameters); set zeroStage: 3 or offloadParams: none",
            lambda s: s.offload_params == "none" or s.zero_stage == 3,
            field="offloadParams",
        ),
        Rule(
            "(self.offloadOptimizer != 'nvme' && self.offloadParams != 'nvme') || size(self.nvmePath) > 0",
            "NVMe offload needs nvmePath (a fast local disk mounted in the worker)",
            lambda s: "nvme" not in (s.offload_optimizer, s.offload_params) or bool(s.nvme_path),
            field="nvmePath",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_cel(*RULES))

    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="ZeRO stage: 3 partitions parameters, gradients and optimizer state.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="Where optimizer state lives.")
    offload_params: Literal["none", "cpu", "nvme"] = Field("none", description="Where parameters live between uses (ZeRO-3 only).")
    nvme_path: PathStr = Field("", description="Local NVMe path for nvme offload.")


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class Teacher(SpecModel):
    """The large model that is fine-tuned on medical data first."""

    RULES = (
        Rule(
            "self.method == 'full' || has(self.lora)",
            "method lora/qlora needs a lora section (add `lora: {}` for the defaults)",
            lambda s: s.method == "full" or s.lora is not None,
            field="lora",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_cel(*RULES))

    model: ModelSourceStr = Field(
        ...,
        min_length=1,
        description="Model source: a Hugging Face id, a local directory, a .gguf file, pvc://CLAIM/PATH (a directory or .gguf on a PersistentVolumeClaim of the job's namespace, mounted read-only into every stage and serving pod), s3://bucket/prefix, or builtin:smollm2-135m-instruct.",
    )
    datasets: list[DatasetRefStr] = Field(
        ...,
        min_length=1,
        max_length=64,
        description="Training data as dataset references FORMAT:PATH[#SPLIT], e.g. pubmedqa:@samples/pubmedqa/ori_pqal.json#train or jsonl:pvc://data/medquad.jsonl (a file on the claim `data`, mounted read-only into every stage pod).",
    )
    method: Literal["full", "lora", "qlora"] = Field("full", description="Fine-tune method: full weights, LoRA adapters, or LoRA on a 4-bit base (QLoRA).")
    lora: Lora | None = Field(None, description="LoRA settings for method lora/qlora.")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="DeepSpeed ZeRO stage and offload.")
    resources: Resources = Field(default_factory=Resources, description="Workers and their resources.")
    training: Training = Field(default_factory=Training, description="Hyperparameters.")
    prompt_style: Literal["plain", "r1"] = Field("plain", description="Prompt style: plain answers, or DeepSeek-R1 <think> reasoning then a final answer line.")

    @field_validator("datasets")
    @classmethod
    def _check_datasets(cls, v: list[str]) -> list[str]:
        return _dataset_refs(v)

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str | None) -> str | None:
        return _model_source(v)


class DeriveStudent(SpecModel):
    """Make the student from the teacher by keeping a subset of its layers (Minitron-style pruning)."""

    keep_layers: int = Field(..., ge=1, le=1024, description="Decoder layers the student keeps.")
    strategy: Literal["importance", "uniform", "first"] = Field(
        "importance",
        description="importance keeps the layers that change the hidden state most on the training data (ShortGPT block influence); uniform keeps evenly spaced layers (always the first and last); first keeps the first N.",
    )


class Student(SpecModel):
    """The small model that learns from the teacher, trained with LoRA."""

    RULES = (
        Rule(
            "has(self.model) != has(self.derive)",
            "set exactly one of student.model (its own weights) or student.derive (pruned from the teacher)",
            lambda s: (s.model is not None) != (s.derive is not None),
        ),
    )
    model_config = ConfigDict(json_schema_extra=_cel(*RULES))

    model: ModelSourceStr | None = Field(None, min_length=1, description="Model source of the student (same forms as teacher.model).")
    derive: DeriveStudent | None = Field(None, description="Derive the student from the fine-tuned teacher instead.")
    lora: Lora = Field(default_factory=Lora, description="LoRA on the student's attention projections.")
    resources: Resources = Field(default_factory=Resources, description="Workers and their resources.")
    training: Training = Field(default_factory=lambda: Training(learning_rate=2e-4), description="Hyperparameters.")

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str | None) -> str | None:
        return _model_source(v)


class Distillation(SpecModel):
    """How knowledge moves from teacher to student."""

    RULES = (
        Rule(
            "self.mode == 'logits' || self.teacherCache == 'cached'",
            "teacherCache online is only available in logits mode",
            lambda s: s.mode == "logits" or s.teacher_cache == "cached",
            field="teacherCache",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_cel(*RULES))

    mode: Literal["logits", "sequence", "cross-tokenizer"] = Field(
        "logits",
        description="logits: KL to the teacher's distribution (same tokenizer); sequence: learn from teacher-generated answers (any tokenizers); cross-tokenizer: ULD loss over sorted probabilities (different vocabularies).",
    )
    temperature: float = Field(2.0, gt=0, le=20, description="Softmax temperature for the distillation loss.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the distillation term: loss = (1-alpha)*CE + alpha*T^2*KD.")
    top_k: int = Field(20, ge=1, le=1024, description="Teacher log-probabilities kept per token in the cache.")
    teacher_cache: Literal["cached", "online"] = Field(
        "cached", description="cached: teacher outputs computed once in their own stage; online: teacher runs beside the student."
    )
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Generation length for sequence mode.")
    similarity_threshold: float = Field(
        0.3, ge=0, le=1,
        description="Sequence mode, open questions: keep the teacher's answer when its token F1 or ROUGE-L against the reference is at least this (closed questions need the exact label).",
    )


class Quantization(SpecModel):
    """Post-training weight quantization of the merged student."""

    method: Literal["nf4", "fp4", "int8", "none"] = Field("nf4", description="bitsandbytes 4-bit NF4/FP4, 8-bit LLM.int8, or none.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="Dtype of matmuls on de-quantized weights.")
    skip_modules: list[str] = Field(["lm_head"], description="Modules kept in high precision.")
    mixed_precision: Literal["none", "sensitive"] = Field(
        "none",
        description=(
            "sensitive: the projections 4 bits hurt most stay 16-bit: v_proj and down_proj in the layers "
            "llama.cpp's Q4_K_M gives more bits (first and last eighth, every third between), and every v_proj "
            "of a grouped-query-attention model (small). none: only skipModules stay unquantized."
        ),
    )
    formats: list[Literal["nf4", "w4a16", "gguf"]] | None = Field(
        None,
        description=(
            "4-bit artifacts to make, each with its manifest and evaluation row. nf4: bitsandbytes (the "
            "method above; the paper's and QLoRA's format); w4a16: 4-bit weights, 16-bit activations, group "
            "size 128, compressed-tensors (vLLM's Marlin kernels on GPU); gguf: llama.cpp GGUF (ggufType), "
            "for CPU serving and edge devices. Unset: chosen per hardware."
        ),
    )
    gguf_type: Literal["Q4_K_M", "Q4_0", "Q8_0"] = Field(
        "Q4_K_M", description="llama.cpp quantization type of the gguf format. Q4_K_M's k-quants need rows of a "
        "multiple of 256; narrower ones fall back to Q5_0/Q8_0 (a 576-wide model such as SmolLM2-135M is then "
        "mostly Q5_0), where Q4_0 (rows of a multiple of 32) is smaller and runs faster on CPU.")
    w4a16_method: Literal["gptq", "rtn"] = Field(
        "gptq",
        alias="w4a16Method",  # not the generator's w4A16Method
        description=(
            "How the w4a16 format rounds: gptq (each column's rounding error compensated in the columns after it, "
            "weighted by a calibration sample of 32 training records; llm-compressor's recipe) or rtn (round-to-nearest, "
            "no calibration)."
        ),
    )


class Evaluation(SpecModel):
    """Medical QA evaluation of the base model, teacher, student and quantized student (the paper's table)."""

    # max_length bounds (here and on serving.gate.minAccuracy) keep the CRD's gate rule within the API server's CEL cost budget.
    datasets: list[DatasetRefStr] = Field(..., min_length=1, max_length=64, description="Evaluation sets as dataset references, e.g. pubmedqa:@samples/pubmedqa/ori_pqal.json#test.")
    limit: int = Field(0, ge=0, description="Questions per dataset (0 = all): a seeded sample stratified by label, then questions seen in training are excluded.")
    seed: int = Field(0, description="Seed of the evaluation sample (evaluation.limit).")
    batch_size: int = Field(8, ge=1, le=1024, description="Generation batch size.")
    max_new_tokens: int = Field(32, ge=1, le=32768, description="Tokens generated per answer.")
    prompt_style: Literal["plain", "r1"] = Field("plain", description="Prompt style for evaluation.")
    scoring: list[Literal["generative", "loglik"]] = Field(
        default=["generative", "loglik"],
        min_length=1,
        description="generative: greedy answer, final answer parsed from the text; loglik: the option with the highest log-likelihood (lm-evaluation-harness acc), for multiple-choice and yes/no questions. Both are reported, labelled.",
    )
    latency_questions: int = Field(
        8, ge=0, le=1024,
        description="Questions per dataset answered again one at a time for the batch-1 latency columns (seconds per "
        "question, ms per token), the same ones for every model; 0 skips that pass and leaves the columns empty. "
        "On CPU this pass costs most for the slowest model: 8 open questions of 96 tokens each.",
    )
    models: list[Literal["base", "teacher", "student", "quantized"]] = Field(
        default=["base", "teacher", "student", "quantized"],
        min_length=1,
        description="Which models to evaluate: base (teacher.model before fine-tuning), teacher, student (merged, 16-bit), quantized.",
    )

    @field_validator("datasets")
    @classmethod
    def _check_datasets(cls, v: list[str]) -> list[str]:
        return _dataset_refs(v)


class GateMinAccuracy(SpecModel):
    """A floor on the quantized student's accuracy on one evaluation set."""

    dataset: DatasetRefStr = Field(..., max_length=4096, description="One of evaluation.datasets, written the same way.")
    min_accuracy: float = Field(..., ge=0, le=1, description="Accuracy in [0, 1] the quantized student must reach on it.")


class EvaluationGate(SpecModel):
    """What the quantized student must show on the evaluation before it is served.

    A failing gate leaves the job Succeeded but not Serving, with an EvaluationGate condition giving each
    number against its threshold. The annotation meddistill.io/gate-override: "NAME: REASON" serves it
    anyway; the override is recorded in status and in the model card.
    """

    enabled: bool = Field(False, description="Serve only a quantized student that passes the checks below.")
    scoring: Literal["generative", "loglik"] = Field("generative", description="Which scoring of evaluation.scoring the checks read.")
    min_accuracy: list[GateMinAccuracy] = Field(default_factory=list, max_length=64, description="Per-dataset accuracy floors for the quantized student.")
    min_retention_pct: float | None = Field(
        None, ge=0, le=200,
        description="Floor on the lower bound of the 95% paired-bootstrap interval of quantized / 16-bit student accuracy, in % (needs evaluation.models student and quantized).",
    )
    not_worse_than_base: bool = Field(
        True,
        description="Refuse a quantized student significantly worse than the base model on the same questions (McNemar exact, p < 0.05; needs evaluation.models base).",
    )


class ServingAuth(SpecModel):
    """Bearer-token auth for the endpoint, the token read from a Secret."""

    secret_name: K8sName = Field(..., description="Secret in the job's namespace holding the token (a Secret name: lowercase letters, digits, '-' and '.').")
    key: str = Field("token", min_length=1, description="Key in the Secret.")


class Serving(SpecModel):
    """A Ray Serve deployment of the quantized student with an OpenAI-compatible API."""

    RULES = (
        Rule(
            "self.minReplicas <= self.maxReplicas",
            "minReplicas must be <= maxReplicas",
            lambda s: s.min_replicas <= s.max_replicas,
            field="minReplicas",
        ),
        Rule(
            "!has(self.initialReplicas) || (self.initialReplicas >= self.minReplicas && self.initialReplicas <= self.maxReplicas)",
            "initialReplicas must lie between minReplicas and maxReplicas",
            lambda s: s.initial_replicas is None or s.min_replicas <= s.initial_replicas <= s.max_replicas,
            field="initialReplicas",
        ),
        Rule(
            "self.targetOngoingRequests <= double(self.maxOngoingRequests)",
            "targetOngoingRequests must be <= maxOngoingRequests, or replicas never look busy enough to scale",
            lambda s: s.target_ongoing_requests <= s.max_ongoing_requests,
            field="targetOngoingRequests",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_cel(*RULES))

    enabled: bool = Field(True, description="Deploy the quantized student after evaluation.")
    engine: Literal["auto", "transformers", "vllm", "llamacpp"] = Field(
        "auto",
        description="auto: vLLM (Ray Serve LLM) on GPU; on CPU llama.cpp when quantization.formats has gguf, else our transformers engine. llamacpp: the gguf format with continuous batching.",
    )
    model_name: str = Field("meddistill-student", min_length=1, description="Model id clients send in the OpenAI API.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Autoscaling floor.")
    initial_replicas: int | None = Field(None, ge=0, le=1000, description="Replicas at start (default minReplicas).")
    max_replicas: int = Field(2, ge=1, le=1000, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(4, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests a replica accepts before callers get backpressure (429/503).")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests batched into one generation step.")
    max_model_len: int = Field(2048, ge=64, description="Longest prompt + completion in tokens; longer prompts get a 400.")
    stream_interval: int = Field(
        1, ge=1, le=64, description="Tokens per streamed chunk after the first (which goes out at once). Above 1, "
        "each chunk costs one pass through the replica, Serve's proxy and the client instead of one per token: "
        "more tokens/s under concurrency on CPU, chunkier streams. The transformers and llama.cpp engines; "
        "vLLM replicas keep vLLM's own default.")
    gpus_per_replica: int = Field(0, ge=0, le=16, description="GPUs per replica.")
    cpus_per_replica: int = Field(1, ge=1, le=256, description="CPUs per replica.")
    auth: ServingAuth | None = Field(None, description="Require a bearer token from this Secret.")
    log_prompts: bool = Field(False, description="Write prompts and answers to logs (off: they may hold patient data).")
    gate: EvaluationGate = Field(default_factory=EvaluationGate, description="Evaluation gate: what the quantized student must show before it is served.")
    replaces: str | None = Field(
        None, min_length=1,
        description=("Name of another MedDistillJob in this namespace whose serving app (and endpoint) this job takes over in "
                     "place: the old model keeps answering until this job's is ready and has passed its gate. On a Ray "
                     "cluster (spec.ray); refused on KubeRay. See docs/replacing-models.md."),
    )
    chat_system_prompt: str | None = Field(
        None,
        description=(
            "System message for chats that send none (transformers engine). Unset: the open-question "
            "template's, the one the student was fine-tuned with; \"\": none (the model's chat-template default)."
        ),
    )


class RunPolicy(SpecModel):
    """Retries and time limits for each stage's Ray job."""

    backoff_limit: int = Field(2, ge=0, le=BACKOFF_LIMIT_MAX, description="Retries of a failed stage before the job fails; attempt n+1 starts 10 s * 2^(n-1) (at most 10 min) after attempt n failed. Raising it resumes a Failed job.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Deadline of each stage's RayJob.")
    ttl_seconds_after_finished: int = Field(
        0, ge=0, description="How long a finished stage's Ray cluster (its head and worker pods, GPUs included) is "
        "kept, e.g. to read its dashboard; 0 deletes it when the stage ends. The RayJob object and its submitter "
        "Job (`kubectl logs job/NAME`) stay until the MedDistillJob is deleted.")


class Artifacts(SpecModel):
    """Where models, caches and reports go."""

    uri: PathStr = Field(
        "./runs",
        min_length=1,
        pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|[^:]+)$",
        description="Artifact store: a local path, pvc://CLAIM/PATH (mounted into every pod), or s3://BUCKET/PREFIX. The job's artifacts go under <uri>/<job name>/ with `meddistill run`, and under <uri>/<namespace>/<job name>-<first 8 characters of its uid>/ when the operator runs it (jobs of two namespaces, or a re-created job, never share artifacts). A local path works for `meddistill run` and, absolute, on a Ray cluster whose nodes and operator all mount it; the operator refuses it on KubeRay (each pod's filesystem is its own).",
    )
    secret_name: Annotated[str, Field(max_length=253, pattern=rf"^(?:{PVC_CLAIM_PATTERN})?$")] = Field(
        "", description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL) for s3:// (a Secret name: lowercase letters, digits, '-' and '.').")


class RayTarget(SpecModel):
    """Run on an existing Ray cluster instead of KubeRay-created ones: one the platform team listed."""

    RULES = (
        Rule(
            "!has(self.cluster) || !has(self.address) || self.cluster == '' || self.address == ''",
            "set cluster or address, not both (cluster names a listed Ray cluster; address must be one's URL)",
            lambda s: not (s.cluster and s.address),
            field="cluster",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_cel(*RULES))

    # The operator sends a cluster's token and the job's Secrets there, so only the platform team's
    # list (the chart's rayClusters) decides where that may be; a job names an entry.
    cluster: str = Field(
        "",
        pattern=r"^(|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$",
        description="Name of a Ray cluster the operator lists (the chart's rayClusters): its address and token come from that list. Empty: the operator's default cluster if it has one, else KubeRay RayJobs.",
    )
    # Not ray:// (Ray Client): the operator submits through the dashboard's Jobs and Serve REST APIs.
    address: str = Field(
        "",
        pattern=r"^(|https?://.+)$",
        description="Ray dashboard/Jobs API address (https://head:8265), accepted only when it is the address of a cluster the operator lists (the chart's rayClusters; anything else is refused with a RayClusterUnavailable condition and nothing is sent there); prefer spec.ray.cluster. A ray:// client address has no Jobs API.",
    )


class Toleration(SpecModel):
    """A Kubernetes toleration (e.g. of a GPU node pool's taint)."""

    key: str = Field("", description="Taint key; empty with operator Exists tolerates every taint.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal: key and value match; Exists: the key alone.")
    value: str = Field("", description="Taint value (operator Equal).")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field("", description="Taint effect; empty: all.")
    toleration_seconds: int | None = Field(None, ge=0, description="How long a NoExecute taint is tolerated.")


class PodScheduling(SpecModel):
    """Where and as whom the pods of a stage (or of serving) run."""

    node_selector: dict[str, str] | None = Field(None, description="Node labels the pods require, e.g. a GPU pool.")
    tolerations: list[Toleration] | None = Field(None, description="Taints the pods tolerate.")
    priority_class_name: K8sName | None = Field(None, description="PriorityClass of the pods (its name: lowercase letters, digits, '-' and '.').")
    image_pull_secrets: list[K8sName] | None = Field(None, description="Secrets for pulling spec.image from a private registry (Secret names).")
    service_account_name: K8sName | None = Field(None, description="ServiceAccount of the pods (default: the namespace's default; its name: lowercase letters, digits, '-' and '.').")
    automount_service_account_token: bool | None = Field(
        None, description="Mount the ServiceAccount's API token into the pods (default false: stage code never calls the Kubernetes API).")


class StageScheduling(SpecModel):
    """Per-stage overrides: a field set here replaces the job-wide value for that stage's pods."""

    teacher: PodScheduling | None = Field(None, description="Teacher fine-tune pods.")
    distill_data: PodScheduling | None = Field(None, description="Teacher-output caching pods.")
    distill: PodScheduling | None = Field(None, description="Distillation pods.")
    quantize: PodScheduling | None = Field(None, description="Quantization pods.")
    evaluate: PodScheduling | None = Field(None, description="Evaluation pods.")
    serving: PodScheduling | None = Field(None, description="Serving (RayService) pods.")


class Scheduling(PodScheduling):
    """Pod placement for every stage and serving, with per-stage overrides (`stages`)."""

    stages: StageScheduling = Field(default_factory=StageScheduling, description="Per-stage overrides.")

    def for_stage(self, stage: str) -> PodScheduling:
        """The job-wide settings with the stage's own (stage name, or "serving") laid over them."""
        fields = PodScheduling.model_fields
        merged = {k: getattr(self, k) for k in fields}
        override = getattr(self.stages, stage.replace("-", "_"))
        if override is not None:
            merged.update({k: getattr(override, k) for k in fields if getattr(override, k) is not None})
        return PodScheduling(**merged)


# serving.gate's rules hold only for an enabled gate; has() guards because a section left out of the
# object has no defaults applied inside it.
_GATE_OFF = ("!has(self.serving) || !has(self.serving.gate) || !has(self.serving.gate.enabled) || "
             "!self.serving.gate.enabled || ")
_EVAL_MODELS = "(has(self.evaluation.models) ? self.evaluation.models : ['base', 'teacher', 'student', 'quantized'])"
_EVAL_SCORING = "(has(self.evaluation.scoring) ? self.evaluation.scoring : ['generative', 'loglik'])"


def _gate_on(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda s: not s.serving.gate.enabled or check(s)


class MedDistillJobSpec(SpecModel):
    """One medical-LLM pipeline: teacher fine-tune -> distillation -> quantization -> evaluation -> serving."""

    RULES = (
        Rule(
            _GATE_OFF + f"'quantized' in {_EVAL_MODELS}",
            "serving.gate judges the quantized student: add quantized to evaluation.models or disable the gate",
            _gate_on(lambda s: "quantized" in s.evaluation.models),
            field="serving.gate.enabled",
        ),
        Rule(
            _GATE_OFF + "!has(self.serving.gate.minAccuracy) || "
            "self.serving.gate.minAccuracy.all(m, m.dataset in self.evaluation.datasets)",
            "each serving.gate.minAccuracy dataset must be one of evaluation.datasets, written exactly the same way",
            _gate_on(lambda s: all(m.dataset in s.evaluation.datasets for m in s.serving.gate.min_accuracy)),
            field="serving.gate.minAccuracy",
        ),
        Rule(
            _GATE_OFF + f"(has(self.serving.gate.scoring) ? self.serving.gate.scoring : 'generative') in {_EVAL_SCORING}",
            "serving.gate.scoring must be one of evaluation.scoring: add it there or change the gate's scoring",
            _gate_on(lambda s: s.serving.gate.scoring in s.evaluation.scoring),
            field="serving.gate.scoring",
        ),
        Rule(
            _GATE_OFF + "!has(self.serving.gate.minRetentionPct) || "
            f"('student' in {_EVAL_MODELS} && 'quantized' in {_EVAL_MODELS} && 'generative' in {_EVAL_SCORING})",
            "serving.gate.minRetentionPct compares the generative answers of the 16-bit and quantized student: it needs "
            "evaluation.models student and quantized and evaluation.scoring generative (add them, or remove minRetentionPct)",
            _gate_on(lambda s: s.serving.gate.min_retention_pct is None or (
                {"student", "quantized"} <= set(s.evaluation.models) and "generative" in s.evaluation.scoring)),
            field="serving.gate.minRetentionPct",
        ),
        Rule(
            _GATE_OFF + f"!(has(self.serving.gate.notWorseThanBase) ? self.serving.gate.notWorseThanBase : true) || "
            f"'base' in {_EVAL_MODELS}",
            "serving.gate.notWorseThanBase compares with the base model: add base to evaluation.models or set "
            "notWorseThanBase: false",
            _gate_on(lambda s: not s.serving.gate.not_worse_than_base or "base" in s.evaluation.models),
            field="serving.gate.notWorseThanBase",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_cel(*RULES))

    teacher: Teacher = Field(..., description="The teacher and its fine-tune.")
    student: Student = Field(..., description="The student and how it is made.")
    distillation: Distillation = Field(default_factory=Distillation, description="Distillation settings.")
    quantization: Quantization = Field(default_factory=Quantization, description="Quantization of the student.")
    evaluation: Evaluation = Field(..., description="Evaluation datasets and limits.")
    serving: Serving = Field(default_factory=Serving, description="Serving the quantized student.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries and deadlines.")
    artifacts: Artifacts = Field(default_factory=Artifacts, description="Artifact store.")
    ray: RayTarget = Field(default_factory=RayTarget, description="Existing Ray cluster to use instead of KubeRay.")
    image: ImageRef = Field("", description="Container image of the stage and serving pods, [REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST] (e.g. registry.hospital.local:5000/meddistill:0.1.0); empty: the operator's own image (the chart's image.repository:image.tag), so one chart value sets the image of every pod.")
    suspend: bool = Field(False, description="Stop before the next stage and remove the running child; set false to resume.")
    queue_name: QueueName = Field("", description="Kueue LocalQueue for the stage RayJobs (sets the kueue.x-k8s.io/queue-name label; a LocalQueue name of at most 63 characters).")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Node selection, tolerations, priority, pull secrets and ServiceAccount of the stage and serving pods (KubeRay backend).")


# --------------------------------------------------------------------------------------------
# Status (written by the operator only)
# --------------------------------------------------------------------------------------------


class Condition(SpecModel):
    """A Kubernetes metav1.Condition."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(..., description="Condition type, e.g. Ready, Failed, Suspended.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="CamelCase machine reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(..., description="RFC 3339 time of the last status change.")
    observed_generation: int | None = Field(None, description="Spec generation the condition was set for.")


class StageStatus(SpecModel):
    """One pipeline stage as the operator sees it."""

    name: str = Field(..., description="Stage name.")
    state: Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Skipped"] = Field(
        ..., description="Stage state. Queued: its run waits for a queue (Kueue, spec.queueName) to admit it.")
    attempt: int = Field(0, description="Current attempt (1-based once started).")
    child: str = Field("", description="Name of the RayJob (or Ray job id) running this stage.")
    start_time: str = Field("", description="RFC 3339 start time.")
    end_time: str = Field("", description="RFC 3339 end time.")
    artifact_uri: str = Field("", description="Where the stage's artifact is.")
    artifact_digest: str = Field("", description="sha256 of the artifact's manifest.")
    message: str = Field("", description="Last message from the stage's job.")
    last_failure: str = Field("", description="Why its last failed attempt failed (kept while it waits to retry).")


class ResultRow(SpecModel):
    """One row of the paper's table: one model on one dataset."""

    model: str = Field(..., description="base, teacher, student or quantized.")
    dataset: str = Field("", description="Evaluation set.")
    accuracy: float = Field(0.0, description="Accuracy in [0, 1].")
    ci_low: float = Field(0.0, description="95% Wilson interval, lower bound.")
    ci_high: float = Field(0.0, description="95% Wilson interval, upper bound.")
    n: int = Field(0, description="Questions scored (after exclusions).")
    excluded: int = Field(0, description="Sampled questions left out because they occur in the training data.")
    unparsed_rate: float = Field(0.0, description="Share of answers that could not be parsed (counted wrong).")
    scoring: str = Field("generative", description="generative (answer extracted from generated text) or loglik (most likely option).")
    dtype: str = Field("", description="Dtype the model was evaluated in (bfloat16, float32, or the quantization, e.g. nf4).")
    weight_bytes: int = Field(0, description="Bytes of weights, quantization state included.")
    peak_memory_bytes: int = Field(0, description="Peak memory while evaluating.")
    latency_ms: float = Field(0.0, description="Generation time per question at the evaluation batch size (ms), amortized.")
    latency_b1_ms: float | None = Field(None, description="Latency per question at batch size 1 after warm-up (ms).")
    ms_per_token: float | None = Field(None, description="Time per generated token at batch size 1 (ms).")
    tokens_per_second: float = Field(0.0, description="Throughput: generated tokens per second at the evaluation batch size.")
    open_f1: float | None = Field(None, description="Open questions: mean token F1 against the reference answers.")
    open_rouge_l: float | None = Field(None, description="Open questions: mean ROUGE-L F against the reference answers.")
    repetition_mean: float | None = Field(None, description="Mean share of repeated 4-grams in the answers.")
    repetitive_n: int | None = Field(None, description="Answers counted as repetitive.")
    keyword_hits: int | None = Field(None, description="Expected keywords found in open answers.")
    keyword_n: int | None = Field(None, description="Expected keywords asked for.")


class Comparison(SpecModel):
    """Model b against model a on the same questions (paired by question id)."""

    a: str = Field(..., description="Reference model, e.g. teacher.")
    b: str = Field(..., description="Compared model, e.g. student.")
    dataset: str = Field("", description="Evaluation set; empty = all datasets pooled.")
    n: int = Field(0, description="Questions both models were scored on.")
    delta_pct_points: float = Field(0.0, description="Accuracy of b minus accuracy of a, in percentage points.")
    ci_low: float = Field(0.0, description="95% paired-bootstrap interval of the difference, lower bound (points).")
    ci_high: float = Field(0.0, description="95% paired-bootstrap interval of the difference, upper bound (points).")
    only_a_correct: int = Field(0, description="Discordant questions only a answered correctly.")
    only_b_correct: int = Field(0, description="Discordant questions only b answered correctly.")
    p_value: float = Field(1.0, description="McNemar exact test, two-sided.")
    verdict: str = Field("", description="The result in plain words.")


class Reductions(SpecModel):
    """Footprint of the quantized student relative to another model (positive = smaller / faster)."""

    baseline: str = Field("", description="The model compared against, with its dtype.")
    memory_reduction_pct: float | None = Field(None, description="Weight bytes, quantization state counted.")
    peak_memory_reduction_pct: float | None = Field(None, description="Peak memory while evaluating.")
    latency_reduction_pct: float | None = Field(None, description="Latency per question at batch size 1.")
    per_token_latency_reduction_pct: float | None = Field(None, description="Time per generated token at batch size 1.")


class ExcludedQuestions(SpecModel):
    """Evaluation questions left out of scoring because the training data contains them."""

    dataset: str = Field(..., description="Evaluation set.")
    count: int = Field(0, description="How many sampled questions were excluded.")
    ids: list[str] = Field(default_factory=list, description="Their record ids (in the job's status: at most 20, each as sha256:<12 hex> of the id, since ids may identify patients; results.json keeps them whole).")


class Results(SpecModel):
    """The paper's table for this job."""

    rows: list[ResultRow] = Field(default_factory=list, description="Per model x dataset rows.")
    comparisons: list[Comparison] = Field(default_factory=list, description="teacher - base, student - teacher, quantized - student, paired.")
    excluded: list[ExcludedQuestions] = Field(default_factory=list, description="Per dataset: questions excluded as seen in training.")
    memory_reduction_pct: float | None = Field(None, description="The paper's comparison: weight memory of the quantized student vs the 16-bit student, -x%.")
    peak_memory_reduction_pct: float | None = Field(None, description="Peak memory of the quantized student vs the 16-bit student, -x%.")
    latency_reduction_pct: float | None = Field(None, description="Batch-1 latency per question of the quantized student vs the 16-bit student, -y%.")
    per_token_latency_reduction_pct: float | None = Field(None, description="Batch-1 time per token of the quantized student vs the 16-bit student, -y%.")
    accuracy_retention_pct: float | None = Field(None, description="Quantized student accuracy as % of the 16-bit student's (all datasets pooled).")
    retention_ci_low: float | None = Field(None, description="95% paired-bootstrap interval of the retention, lower bound (%).")
    retention_ci_high: float | None = Field(None, description="95% paired-bootstrap interval of the retention, upper bound (%).")
    teacher_vs_quantized: Reductions | None = Field(None, description="Second line: the quantized student's footprint vs the teacher.")
    report_uri: str = Field("", description="Where the JSON/markdown/PNG report is.")


class GateCheck(SpecModel):
    """One check of the evaluation gate, its number against its threshold."""

    name: str = Field(..., description="minAccuracy, minRetentionPct or notWorseThanBase.")
    dataset: str = Field("", description="Evaluation set the check reads (empty = all pooled).")
    value: float | None = Field(None, description="The measured number (accuracy in [0, 1], retention lower bound in %, or the p-value).")
    threshold: float | None = Field(None, description="What it had to reach.")
    passed: bool = Field(False, description="Whether it did.")
    message: str = Field("", description="The check in plain words.")


class GateStatus(SpecModel):
    """The evaluation gate's verdict for the quantized student."""

    passed: bool = Field(False, description="All checks passed.")
    checks: list[GateCheck] = Field(default_factory=list, description="Each check with its number and threshold.")
    overridden_by: str = Field("", description="Who overrode a failing gate (the meddistill.io/gate-override annotation).")
    override_reason: str = Field("", description="The reason they gave.")


class ServingStatus(SpecModel):
    """Where the model is served."""

    endpoint: str = Field("", description="Base URL of the OpenAI-compatible API (…/v1).")
    model_name: str = Field("", description="Model id to send.")
    ready: bool = Field(False, description="Whether the endpoint is up.")
    child: str = Field("", description="RayService (or Serve app) name.")


class MedDistillJobStatus(SpecModel):
    """Observed state, written whole by the operator."""

    phase: Literal["Pending", "Running", "Succeeded", "Serving", "Failed", "Suspended"] = Field("Pending", description="Overall phase.")
    current_stage: str = Field("", description="Stage running now (empty when none).")
    accuracy: str = Field("", description="Accuracy of the quantized student, for `kubectl get`.")
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes conditions.")
    stages: list[StageStatus] = Field(default_factory=list, description="Per-stage state.")
    results: Results | None = Field(None, description="The accuracy / memory / latency table.")
    serving: ServingStatus | None = Field(None, description="The serving endpoint.")
    gate: GateStatus | None = Field(None, description="The evaluation gate's verdict (serving.gate).")
    model_card: str = Field("", description="The job's model card: README.md in the evaluate artifact (`meddistill card JOB_DIR` prints it).")
    observed_generation: int = Field(0, description="Spec generation this status reflects.")


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(..., min_length=1, max_length=NAME_MAX)
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        # The CRD refuses the same names with CEL (crd.py); here the message can say how to fix it.
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError("use lowercase letters, digits and '-', starting and ending with a letter or digit "
                             "(no '.' or '_'): child RayJobs and Services are named after the job")
        return v


class MedDistillJob(BaseModel):
    """A whole MedDistillJob document (what `kubectl apply` and `meddistill run` take)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["meddistill.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MedDistillJob"]
    metadata: ObjectMeta
    spec: MedDistillJobSpec
    status: MedDistillJobStatus | None = None


def input_claims(spec: MedDistillJobSpec) -> list[str]:
    """The PersistentVolumeClaims the job reads models and datasets from (its pvc:// inputs), sorted:
    the KubeRay backend mounts each read-only into every stage and serving pod."""
    paths = [spec.teacher.model.strip(), (spec.student.model or "").strip()]
    paths += [parse_dataset_ref(r).path for r in (*spec.teacher.datasets, *spec.evaluation.datasets)]
    return sorted({pvc_claim(p) for p in paths if p.startswith(PVC_SCHEME)})


def pipeline_stages(spec: MedDistillJobSpec) -> list[str]:
    """The stages this job runs, in order (distill-data only when teacher outputs are cached)."""
    stages = ["teacher"]
    if spec.distillation.teacher_cache == "cached":
        stages.append("distill-data")
    stages += ["distill", "quantize", "evaluate"]
    return stages
