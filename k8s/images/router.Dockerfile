# syntax=docker/dockerfile:1
# lorafleet router image: grpcio and protobuf only, no torch. Build from the repository root:
#   docker build -f k8s/images/router.Dockerfile -t lorafleet/router:TAG .
# The build context is filtered by router.Dockerfile.dockerignore beside this file.
ARG PYTHON_SLIM=python:3.12-slim-bookworm

FROM ${PYTHON_SLIM}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 lorafleet && useradd --uid 10001 --gid 10001 --no-create-home lorafleet
WORKDIR /opt/lorafleet/app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY router ./router
COPY shard/__init__.py ./shard/__init__.py
# The project's base dependencies only (the `shard` extra with torch is not installed).
RUN pip install . && rm -rf /opt/lorafleet/app/build
USER 10001:10001
EXPOSE 50051 8000 9090
ENTRYPOINT ["lorafleet-router"]
