#!/usr/bin/env bash
# Fills .whl/ with the wheels a GPU machine that cannot reach PyPI needs to run lorafleet's tests
# and benchmarks (gpu_setup.sh installs them there). Run it here, where pip works, in the
# repository root. The versions are the ones installed in this environment (`make install` or
# `pip install -e '.[test]'` first), so both machines run the same code.
#
# The device image has torch, transformers, peft, safetensors, tokenizers, rich and
# prometheus-client, but no structlog, grpcio-reflection/-health-checking, the OpenAI edge's
# packages or hypothesis, and an older grpcio than our stubs accept. Two dependencies are easy to
# miss: fastapi imports opentelemetry-api at import time, and openai 3.x imports httpx2.
set -euo pipefail
PYTHON=${PYTHON:-python3}
WHL=${WHL:-.whl}
PACKAGES=(
  structlog grpcio grpcio-tools grpcio-reflection grpcio-health-checking protobuf
  fastapi starlette pydantic pydantic-core typing-inspection annotated-types annotated-doc
  typing-extensions opentelemetry-api uvicorn h11 click uvloop dnslib
  openai httpx httpcore httpx2 httpcore2 truststore anyio sniffio jiter tqdm certifi idna
  hypothesis attrs sortedcontainers pytest-timeout prometheus-client
)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PYTHON" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$version" ] || { echo "not installed here: $name (install the test extras first)" >&2; exit 1; }
  pins+=("$name==$version")
done
rm -rf "$WHL" && mkdir -p "$WHL"
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
# The GPU image runs CPython 3.12 on x86-64.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$WHL" "${pins[@]}"
echo "$(ls "$WHL" | wc -l) wheels, $(du -sh "$WHL" | cut -f1) in $WHL"
