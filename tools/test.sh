#!/usr/bin/env bash
# The README's test command: a brand-new virtual environment (so nothing installed on this machine
# by hand can make a run green), the project installed into it with tools/install.sh --dev, the
# Kubernetes/KubeRay binaries (tools/kube/build.sh, cached), then pytest with any arguments given.
#
#   tools/test.sh                      the whole suite (what CI runs): the real-cluster tests (-m cluster)
#                                      and the end-to-end quickstart (-m e2e) beside the rest, see below
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

# The whole suite, as three pytest processes side by side (each its own kube-apiserver and Ray; lines
# prefixed, per-test durations in .test-reports/*.xml and in the slowest-25 list each prints):
#   [cluster]  -m cluster: the quickstart on real pods (its own node cluster, its Ray inside pods), then
#              -m own_ray: the tests that start a Ray of their own (multi-node, `meddistill run`), so that
#              the three pytests end near each other
#   [e2e]      -m e2e: the quickstart through the operator on a Ray head (the session's one full pipeline)
#   (no prefix) everything else
# An end-to-end run is mostly one Ray Train worker or one evaluation at a time, so alone it leaves a core
# idle; side by side with the rest it fills it.
# RAY_ADDRESS=local: a `ray.init()` without an address would otherwise look for a running Ray on this
# machine and find the e2e head or a pod's (Ray refuses to pick between two, or joins one).
mkdir -p .test-reports
pids=()
RAY_ADDRESS=local pytest -m "cluster or own_ray" --junitxml=.test-reports/cluster.xml > >(sed -u 's/^/[cluster] /') 2>&1 &
pids+=($!)
pytest -m "e2e and not cluster and not own_ray" --junitxml=.test-reports/e2e.xml > >(sed -u 's/^/[e2e] /') 2>&1 &
pids+=($!)
trap 'kill -INT "${pids[@]}" 2>/dev/null || true' EXIT  # interrupted: the side runs tear down too
main_rc=0
RAY_ADDRESS=local pytest -m "not cluster and not e2e and not own_ray" --junitxml=.test-reports/main.xml || main_rc=$?
side_rc=()
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  # pytest's 5 is "no tests collected": not a failure of a side run when every one of its tests was deselected.
  side_rc+=($(( rc == 5 ? 0 : rc )))
done
trap - EXIT
echo "[test] exit codes: main $main_rc, cluster ${side_rc[0]}, e2e ${side_rc[1]}; $((SECONDS - start))s in all" >&2
for rc in "$main_rc" "${side_rc[@]}"; do [[ $rc -ne 0 ]] && exit "$rc"; done
exit 0
