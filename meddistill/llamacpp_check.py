"""Can this machine's llama.cpp build decode? Checked once per machine, in a child process.

A llama.cpp compiled for instructions this processor cannot run does not raise: it kills the process
that called it with SIGILL (issue 21: ggml's AMX matmul on an AMX Xeon, from a `-march=native`
build). That process would be a Serve replica, the quantize stage or the evaluation. So before any of
them loads llama.cpp, a child process writes a small GGUF, quantizes it as the quantize stage does
(Q4_0 and Q4_K_M) and decodes a multi-token batch with the project's own `LlamaCppModel`; the
parent only reads its exit status. The verdict is cached under
`${MEDDISTILL_CACHE:-~/.cache/meddistill}/llamacpp-check/<key>.json`, keyed by the hash of the
llama.cpp libraries and of this processor's flags: a rebuilt library or another host checks again.

    verdict = llamacpp_verdict()      # Verdict(ok, reason); ok False also when llama_cpp is absent
    require_llamacpp("serving.engine llamacpp")   # raises LlamaCppUnusable(reason) when not ok

`python -m meddistill.llamacpp_check` prints the verdict (and runs the check if none is cached).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHECK_VERSION = 1  # bump when the probe changes: cached verdicts are then re-checked
PROBE_TIMEOUT_S = 300
# The probe command; tests point it at a program that dies with SIGILL (a build that faults here).
PROBE_ENV = "MEDDISTILL_LLAMACPP_PROBE"
REBUILD = ("rebuild it for every x86-64 processor with `tools/install.sh` (it installs the portable build "
           "from tools/llama/build_wheel.sh), or serve and evaluate the nf4 format instead "
           "(quantization.formats without gguf, serving.engine auto)")


class LlamaCppUnusable(RuntimeError):
    """llama.cpp is missing, or its build cannot run on this processor."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # why not (empty when ok)


def _cache_root() -> Path:
    return Path(os.environ.get("MEDDISTILL_CACHE") or Path.home() / ".cache" / "meddistill").expanduser()


def _library_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _key(lib_dir: Path, probe: str) -> str:
    h = hashlib.sha256(f"{CHECK_VERSION}\n{probe}\n{_cpu_flags()}\n".encode())
    for f in sorted(lib_dir.glob("*.so*")) if lib_dir.is_dir() else ():
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:24]


def _probe_command() -> list[str]:
    custom = os.environ.get(PROBE_ENV)
    return [sys.executable, "-c", custom] if custom else [sys.executable, "-m", "meddistill.llamacpp_check", "--probe"]


def _run_probe(lib_dir: Path) -> Verdict:
    try:
        # From a neutral folder: in a checkout's root, `python -m` would import its operator/ folder as the
        # standard library's operator module.
        res = subprocess.run(_probe_command(), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                             cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return Verdict(False, f"llama.cpp ({lib_dir}) did not finish decoding a small test model in {PROBE_TIMEOUT_S}s")
    if res.returncode == 0:
        return Verdict(True)
    if res.returncode < 0:
        sig = signal.Signals(-res.returncode).name
        what = "an illegal instruction" if sig == "SIGILL" else "a crash"
        return Verdict(False, f"llama.cpp ({lib_dir}) died with {sig} ({what}) decoding a small test model on this "
                              f"processor: a build for instructions this host cannot run as built (a -march=native "
                              f"build from another host, or ggml's AMX matmul, which faults on some Xeons); {REBUILD}")
    last = (res.stderr.strip().splitlines() or ["no output"])[-1]
    return Verdict(False, f"llama.cpp ({lib_dir}) could not decode a small test model (exit {res.returncode}: "
                          f"{last}); {REBUILD}")


def llamacpp_verdict() -> Verdict:
    """Whether llama.cpp is installed and decodes on this processor (cached per library and CPU)."""
    lib_dir = _library_dir()
    if lib_dir is None:
        return Verdict(False, "llama-cpp-python is not installed (tools/install.sh installs it)")
    probe = " ".join(_probe_command()[1:])
    path = _cache_root() / "llamacpp-check" / f"{_key(lib_dir, probe)}.json"
    try:
        cached = json.loads(path.read_text())
        return Verdict(bool(cached["ok"]), str(cached.get("reason", "")))
    except (OSError, ValueError, KeyError):
        pass
    verdict = _run_probe(lib_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"ok": verdict.ok, "reason": verdict.reason, "library": str(lib_dir)}))
    tmp.replace(path)
    return verdict


def llamacpp_usable() -> bool:
    return llamacpp_verdict().ok


def require_llamacpp(what: str) -> None:
    verdict = llamacpp_verdict()
    if not verdict.ok:
        raise LlamaCppUnusable(f"{what} needs llama.cpp, which cannot run here: {verdict.reason}")


# --------------------------------------------------------------------------------------------
# The probe (runs in the child)
# --------------------------------------------------------------------------------------------

EMBD, FF, LAYERS, HEADS, VOCAB = 256, 512, 2, 4, 512  # rows of 256: the k-quants apply too


def write_probe_gguf(path: Path) -> Path:
    """A small random Llama in 16 bits, with a byte-level SentencePiece vocabulary llama.cpp loads."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("meddistill-llamacpp-probe")
    w.add_context_length(256)
    w.add_embedding_length(EMBD)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(EMBD // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"t{i}" for i in range(VOCAB - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (VOCAB - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(rows: int, cols: int):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)

    w.add_tensor("token_embd.weight", mat(VOCAB, EMBD))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(EMBD, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", mat(EMBD, EMBD))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(EMBD, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(FF, EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(FF, EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(EMBD, FF))
    w.add_tensor("output_norm.weight", np.ones(EMBD, np.float32))
    w.add_tensor("output.weight", mat(VOCAB, EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def probe() -> None:
    """Quantize the probe model as the quantize stage does and decode batches with it (prefill of
    several sequences, then a step): the work that faults on a build this processor cannot run."""
    import numpy as np

    from meddistill.jobs.quantize_gguf import quantize_file
    from meddistill.llamacpp_model import LlamaCppModel, Row

    with tempfile.TemporaryDirectory(prefix="meddistill-llamacpp-probe-") as tmp:
        f16 = write_probe_gguf(Path(tmp) / "probe-F16.gguf")
        for gguf_type in ("Q4_0", "Q4_K_M"):
            target = Path(tmp) / f"probe-{gguf_type}.gguf"
            quantize_file(f16, target, gguf_type)
            model = LlamaCppModel(target, n_ctx=128, n_seq_max=4, n_batch=128, threads=2, checked=True)
            prompts = [list(range(3 + s, 3 + s + 48)) for s in range(4)]
            out = model.decode([Row(s, p, 0) for s, p in enumerate(prompts)])
            out = model.decode([Row(s, [int(o[-1].argmax())], len(p)) for s, (p, o) in enumerate(zip(prompts, out))])
            if not all(np.isfinite(o).all() for o in out):
                raise RuntimeError(f"{gguf_type}: non-finite logits")
            model.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--probe"]:
        probe()
        return 0
    verdict = llamacpp_verdict()
    print("llama.cpp: usable on this processor" if verdict.ok else f"llama.cpp: NOT usable: {verdict.reason}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
