# syntax=docker/dockerfile:1
# lorafleet shard image. Build from the repository root (`make image` does):
#   docker build -f k8s/images/shard.Dockerfile --target cuda -t lorafleet/shard:TAG .
#   docker build -f k8s/images/shard.Dockerfile --target cpu  -t lorafleet/shard:TAG-cpu .
# The build context is filtered by shard.Dockerfile.dockerignore beside this file (BuildKit reads
# <Dockerfile>.dockerignore), so .git, tests, benchmarks and local caches stay out.
#
# Kernels (`cuda` target): `python -m shard.ops.build` compiles the SGMV extension ahead of time
# for sm_80 and sm_90a into TORCH_EXTENSIONS_DIR, and the cache ships in
# /opt/lorafleet/torch_extensions. The pod's `seed-kernel-cache` initContainer copies it (with its
# timestamps) into the writable emptyDir at the same path the build used, so the shard's
# cpp_extension.load finds it up to date and starts without compiling. That load still runs ninja
# and looks for the compiler, so the image keeps the CUDA devel base (nvcc, headers); it also lets a
# pod JIT-build (~1 min, into the emptyDir) when the cache does not match. Building needs no GPU
# only if shard.ops.build compiles without one; `--build-arg AOT_KERNELS=0` skips the step and
# leaves the kernels to JIT at first start.

ARG CUDA_VERSION=13.0.0
ARG UBUNTU=ubuntu24.04
ARG PYTHON_SLIM=python:3.12-slim-bookworm
ARG TORCH_VERSION=2.13.0
# Empty: PyPI's default torch (CUDA). For a small CPU image pass PyTorch's CPU wheel index here.
ARG TORCH_INDEX_URL=

# ---------------------------------------------------------------- cpu: the cpu-demo overlay
FROM ${PYTHON_SLIM} AS cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 lorafleet && useradd --uid 10001 --gid 10001 --no-create-home lorafleet
WORKDIR /opt/lorafleet/app
RUN pip install ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY router ./router
COPY shard ./shard
COPY csrc ./csrc
RUN pip install -e '.[shard]'
# The cpu-demo initContainer writes the tiny model with `python -m shard.tiny`, which builds it
# with transformers and its adapters with peft (the versions the tests check it with).
RUN pip install "transformers==5.23.0" "peft==0.21.2"
USER 10001:10001
EXPOSE 50061 9090
ENTRYPOINT ["lorafleet-shard"]

# ---------------------------------------------------------------- cuda: the gpu overlay (default)
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS cuda
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG AOT_KERNELS=1
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/var/cache/lorafleet/torch_extensions \
    TORCH_CUDA_ARCH_LIST="8.0;9.0a"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && groupadd --gid 10001 lorafleet && useradd --uid 10001 --gid 10001 --no-create-home lorafleet
RUN pip install ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} "torch==${TORCH_VERSION}"
WORKDIR /opt/lorafleet/app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY router ./router
COPY shard ./shard
COPY csrc ./csrc
RUN pip install -e '.[shard]'
RUN mkdir -p /opt/lorafleet/torch_extensions \
 && if [ "$AOT_KERNELS" = 1 ]; then \
      python -m shard.ops.build \
      && cp -R --preserve=mode,timestamps "$TORCH_EXTENSIONS_DIR"/. /opt/lorafleet/torch_extensions/ \
      && rm -rf "$TORCH_EXTENSIONS_DIR"; \
    fi
USER 10001:10001
EXPOSE 50061 9090
ENTRYPOINT ["lorafleet-shard"]
