#!/usr/bin/env bash
# The README's test command: a brand-new virtual environment (so nothing installed on this machine
# by hand can make a run green), the project installed into it with tools/install.sh --dev, the
# Kubernetes/KubeRay binaries (tools/kube/build.sh, cached), then pytest with any arguments given.
#
#   tools/test.sh                      the whole suite (what CI runs): the real-cluster tests
#                                      (-m cluster) in a second pytest beside the rest, see below
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
# OpenMP threads that finished their share spin for GOMP's default 300,000 rounds before they sleep. On 2
# cores with two torch processes at work (a Ray Train worker and an evaluation, a serve replica and a test,
# a pod and the host) each spins on the core the other needs: two concurrent batch-1 generators of
# SmolLM2-135M ran at 670 ms/token each, against 58 ms/token alone; at 10,000 rounds 143 ms/token (alone
# 53). tests/test_jobs_cross_tokenizer.py: 108 s by default, 65 s at 10,000. Inherited by every Ray this
# suite starts; the product image sets the same (Dockerfile).
export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-10000}"
[[ $# -gt 0 ]] && exec pytest "$@"

# The whole suite. The real-cluster module shares no fixture with the rest (its own node cluster, its Ray
# inside pods), so it runs in a second pytest beside the main one instead of after it (measured: 28 min
# beside the main suite's 67, which it no longer adds to; CPU was 93 % busy while both ran). Its lines carry a
# "[cluster] " prefix; per-test durations of both go to .test-reports/*.xml (junit) as well as the
# slowest-25 lists each pytest prints.
mkdir -p .test-reports
pytest -m cluster --junitxml=.test-reports/cluster.xml > >(sed -u 's/^/[cluster] /') 2>&1 &
cluster_pid=$!
trap 'kill -INT "$cluster_pid" 2>/dev/null || true' EXIT  # interrupted: the cluster tests tear down too
main_rc=0
pytest -m "not cluster" --junitxml=.test-reports/main.xml || main_rc=$?
cluster_rc=0
wait "$cluster_pid" || cluster_rc=$?
trap - EXIT
echo "[test] main suite exit $main_rc, cluster suite exit $cluster_rc, $((SECONDS - start))s in all" >&2
# pytest's 5 is "no tests collected": not a failure of the cluster half when every test was deselected.
[[ $cluster_rc -eq 5 ]] && cluster_rc=0
exit $(( main_rc != 0 ? main_rc : cluster_rc ))
