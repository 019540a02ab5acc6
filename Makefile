# lorafleet: `make run` (demo) and `make test` (everything CI checks).
PYTHON ?= python3
PROTOS := protos/generate.proto protos/shard.proto
STUBS_DIR := protos
DEMO_DIR ?= .demo
MODEL ?=
ADAPTERS ?=

.PHONY: install protos check-protos lint test test-fast kernels run clean image

install:
	$(PYTHON) -m pip install -e '.[test]'

protos:
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Regenerates the stubs into a scratch folder and fails when the committed ones differ.
check-protos:
	@tmp=$$(mktemp -d); mkdir -p $$tmp/protos; cp $(PROTOS) $$tmp/protos/; \
	  (cd $$tmp && $(PYTHON) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)) && \
	  for f in generate_pb2.py generate_pb2.pyi generate_pb2_grpc.py shard_pb2.py shard_pb2.pyi shard_pb2_grpc.py; do \
	    cmp -s $$tmp/protos/$$f $(STUBS_DIR)/$$f || { echo "protos/$$f is stale: run 'make protos'"; rm -rf $$tmp; exit 1; }; \
	  done; rm -rf $$tmp; echo "protos: stubs up to date"

lint:
	$(PYTHON) -m ruff check protos router shard tests benchmarks
	$(PYTHON) -m ruff format --check router shard tests benchmarks
	buf lint --config protos/buf.yaml --path protos .

test: check-protos lint
	$(PYTHON) -m pytest -q tests

kernels:
	$(PYTHON) -m shard.ops.build

run:
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
