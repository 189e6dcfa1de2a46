#!/usr/bin/env bash
# Build llama-cpp-python (the version pyproject.toml pins) as a wheel that runs on any x86-64 host
# with AVX2, and print the wheel's path. Cached under
#     ${MEDDISTILL_CACHE:-$HOME/.cache/meddistill}/wheels/llama-cpp-python-<version>-<variant>-<flags hash>/
# so a second call (and every fresh virtual environment) takes a second.
#
# Why not `pip install llama-cpp-python`: PyPI has only its sdist, whose build compiles ggml with
# -march=native. On a Xeon with AMX that enables ggml's AMX matmul, which dies with SIGILL there
# (issue 21), and a wheel built on one host may not run on another (pip's wheel cache, the image).
# GGML_NATIVE=OFF turns -march=native off; ggml then enables SSE4.2/AVX/AVX2/BMI2/FMA/F16C only.
#
# Variants (MEDDISTILL_LLAMA_CPU, or the first argument):
#   avx2     (default) any x86-64-v3 processor: Intel since Haswell (2013), AMD since Zen
#   avx512   adds AVX-512 F/VNNI/BF16 (Skylake-SP+, Zen 4+); never AMX. Dies on hosts without AVX-512.
# The wheel's flags can be overridden whole with MEDDISTILL_LLAMA_CMAKE_ARGS (a different cache key).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd /  # `python -m pip` in the repository root would import its operator/ as the standard library's operator
CACHE="${MEDDISTILL_CACHE:-$HOME/.cache/meddistill}"
PYTHON="${PYTHON:-python3}"
log() { printf '[llama-build] %s\n' "$*" >&2; }

VERSION="$(sed -n 's/^ *"llama-cpp-python==\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml")"
[[ -n "$VERSION" ]] || { log "could not read the llama-cpp-python pin from pyproject.toml"; exit 2; }

VARIANT="${1:-${MEDDISTILL_LLAMA_CPU:-avx2}}"
case "$VARIANT" in
  avx2) FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;;
  avx512) FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" ;;
  *) log "unknown variant '$VARIANT': use avx2 or avx512"; exit 2 ;;
esac
FLAGS="${MEDDISTILL_LLAMA_CMAKE_ARGS:-$FLAGS} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
KEY="$(printf '%s' "$FLAGS" | sha256sum | cut -c1-12)"
DEST="$CACHE/wheels/llama-cpp-python-$VERSION-$VARIANT-$KEY"

wheel="$(ls "$DEST"/llama_cpp_python-*.whl 2>/dev/null | head -1 || true)"
if [[ -n "$wheel" ]]; then
  log "cached: $wheel"
  echo "$wheel"
  exit 0
fi

mkdir -p "$CACHE/wheels"
exec 9>"$CACHE/wheels/.llama-build.lock"
flock 9  # two installs at once build once
wheel="$(ls "$DEST"/llama_cpp_python-*.whl 2>/dev/null | head -1 || true)"
if [[ -z "$wheel" ]]; then
  command -v c++ >/dev/null || { log "needs a C/C++ compiler (apt-get install build-essential)"; exit 2; }
  tmp="$(mktemp -d "$CACHE/wheels/.tmp.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  log "building llama-cpp-python $VERSION ($VARIANT: $FLAGS); about 4 min on 2 cores, once per machine"
  start=$SECONDS
  # --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, and could hand back
  # a -march=native wheel built earlier.
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PYTHON" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    --wheel-dir "$tmp" "llama-cpp-python==$VERSION" >&2
  mkdir -p "$DEST"
  mv "$tmp"/llama_cpp_python-*.whl "$DEST"/
  printf '%s\n' "$FLAGS" >"$DEST/CMAKE_ARGS"
  log "built in $((SECONDS - start))s"
  wheel="$(ls "$DEST"/llama_cpp_python-*.whl | head -1)"
fi
echo "$wheel"
