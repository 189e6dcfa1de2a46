#!/usr/bin/env bash
# The README's test command: a brand-new virtual environment (so nothing installed on this machine
# by hand can make a run green), the project installed into it with tools/install.sh --dev, the
# Kubernetes/KubeRay binaries (tools/kube/build.sh, cached), then pytest with any arguments given.
#
#   tools/test.sh                      the whole suite (what CI runs)
#   tools/test.sh tests/test_spec.py   some of it
#   MEDDISTILL_TEST_VENV=DIR           where the environment goes (default: .venv-test, made anew)
#   MEDDISTILL_REUSE_VENV=1            keep an existing environment (quick local re-runs)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEDDISTILL_TEST_VENV:-$ROOT/.venv-test}"
cd "$ROOT"
start=$SECONDS
# Python tools run as scripts or from outside the repository: `python -m X` here would put the repo root
# on sys.path, where operator/ shadows the standard library's operator module (setup.py maps it).
if [[ "${MEDDISTILL_REUSE_VENV:-0}" != 1 || ! -x "$VENV/bin/python" ]]; then
  rm -rf "$VENV"
  (cd / && python3 -m venv "$VENV")
  "$VENV/bin/pip" install --quiet --upgrade pip
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
PYTHON="$VENV/bin/python" tools/install.sh --dev
echo "[test] environment ready in $((SECONDS - start))s" >&2
tools/kube/build.sh >/dev/null
echo "[test] binaries ready at $((SECONDS - start))s" >&2
exec pytest "$@"
