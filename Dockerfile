# MedDistill image: the operator (`meddistill operator`) and every stage job / serving pod
# (`python -m meddistill.jobs STAGE`, Ray Serve) run from this one image, so what the operator
# submits is exactly what was tested together. What goes in is tools/image/install.sh; the tests
# build the same image without Docker (tools/image/build.sh runs that script and reads the run
# config below), so the two cannot drift.
#   docker build -t registry.hospital.example/meddistill/meddistill:0.1.0 .
# GPU nodes: BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 (with python3.11, python3.11-venv installed).
ARG BASE=python:3.11-slim
FROM ${BASE} AS build
# llama-cpp-python is an sdist on PyPI: the builder compiles it, with the project's portable flags
# (tools/llama/build_wheel.sh: AVX2, never -march=native, so the image runs on any x86-64-v3 node).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml ./
COPY tools/llama tools/llama
RUN mkdir -p /wheels && cp "$(MEDDISTILL_CACHE=/tmp/cache tools/llama/build_wheel.sh)" /wheels/

FROM ${BASE}
COPY --from=build /wheels /wheels
# The dependencies first (a layer that changes only with pyproject.toml), then the package.
COPY pyproject.toml /src/
COPY tools/image/install.sh /src/tools/image/
RUN sh /src/tools/image/install.sh deps
COPY setup.py README.md NOTICE /src/
COPY meddistill /src/meddistill
COPY operator /src/operator
COPY jobs /src/jobs
COPY serve /src/serve
RUN sh /src/tools/image/install.sh app && rm -rf /src /wheels
# Read by tools/image/dockerfile_config.py too (the local build): exec-form ENTRYPOINT/CMD, ENV KEY=VALUE.
# GOMP_SPINCOUNT: a pod's idle OpenMP threads stop spinning after 10,000 rounds (GOMP's default: 300,000), so
# the Ray head, worker, submitter and serving pods sharing a node's cores do not burn them for each other
# (two torch processes on 2 cores: 670 ms/token each by default, 143 at 10,000; one alone: 58 vs 53).
ENV PATH=/opt/meddistill/bin:$PATH HOME=/home/meddistill MEDDISTILL_CACHE=/tmp/meddistill-cache PYTHONUNBUFFERED=1 GOMP_SPINCOUNT=10000
USER 65532:65532
WORKDIR /home/meddistill
ENTRYPOINT ["meddistill"]
CMD ["operator"]
