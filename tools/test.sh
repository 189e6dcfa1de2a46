#!/usr/bin/env bash
# The README's test command: a brand-new virtual environment (so nothing installed on this machine
# by hand can make a run green), the project installed into it with tools/install.sh --dev, the
# Kubernetes/KubeRay binaries (tools/kube/build.sh, cached), then pytest with any arguments given.
#
#   tools/test.sh                      the whole suite (what CI runs): the real-cluster tests (-m cluster)
#                                      and those with a Ray of their own (-m own_ray) beside the rest
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

# The whole suite, as two pytest processes side by side (each its own kube-apiserver and Ray; per-test
# durations in .test-reports/*.xml and in the slowest-25 list each prints):
#   [cluster]  -m cluster: the quickstart on real pods (its own node cluster, its Ray inside pods), then
#              -m own_ray: the tests that start a Ray of their own (multi-node, `meddistill run`, the README's
#              main command), so that both end near each other
#   (no prefix) everything else, the end-to-end quickstart through the operator on a Ray head last
# Measured (docs/results.md, CI time): a third pytest for the end-to-end quickstart made nothing faster; the
# machine's 2 cores were 99 % busy and every pipeline ran 2-3x slower.
# RAY_ADDRESS=local: a `ray.init()` without an address would otherwise look for a running Ray on this
# machine and find the other pytest's or a pod's (Ray refuses to pick between two, or joins one).
mkdir -p .test-reports
# The side run's output also goes to .test-reports/cluster.log: interleaved with the main run's, its failures
# would scroll out of sight (a CI shows the end of the output), so they are repeated after both end.
RAY_ADDRESS=local pytest -m "cluster or own_ray" --junitxml=.test-reports/cluster.xml \
  > >(sed -u 's/^/[cluster] /' | tee .test-reports/cluster.log) 2>&1 &
side_pid=$!
trap 'kill -INT "$side_pid" 2>/dev/null || true' EXIT  # interrupted: the side run tears down too
main_rc=0
RAY_ADDRESS=local pytest -m "not cluster and not own_ray" --junitxml=.test-reports/main.xml || main_rc=$?
side_rc=0
wait "$side_pid" || side_rc=$?
trap - EXIT
echo "[test] exit codes: main $main_rc, cluster $side_rc; $((SECONDS - start))s in all" >&2
if [[ $side_rc -ne 0 && $side_rc -ne 5 ]]; then
  echo "[test] the cluster run failed (whole output: .test-reports/cluster.log); its summary:" >&2
  sleep 2  # the tee behind the side run may still be writing its last lines
  if grep -q "short test summary info" .test-reports/cluster.log; then
    sed -n '/short test summary info/,$p' .test-reports/cluster.log | tail -n 40 >&2
  else
    tail -n 40 .test-reports/cluster.log >&2
  fi
fi
# pytest's 5 is "no tests collected": not a failure of the side run when every one of its tests was deselected.
[[ $side_rc -eq 5 ]] && side_rc=0
exit $(( main_rc != 0 ? main_rc : side_rc ))
