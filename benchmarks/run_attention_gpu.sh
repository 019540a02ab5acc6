#!/usr/bin/env bash
# One device call for the paged-attention part of issue 4: build the extension, run the GPU
# tests of tests/test_attention.py, run the benchmark. Logs and the JSON land in $OUT.
# Needs .whl/ (structlog) carried beside the tree; COMMIT names the commit measured.
set -uo pipefail
OUT=${OUT:-/tmp/attention_out}
WHL=${WHL:-.whl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)
python3 -m shard.ops.build >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(($(date +%s) - start)) s"
start=$(date +%s)
python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_attention.py \
  >"$OUT/tests.log" 2>&1
echo "tests rc=$? in $(($(date +%s) - start)) s"; tail -25 "$OUT/tests.log"
python3 -m benchmarks.bench_attention --out "$OUT/attention_bench.json" \
  --commit "${COMMIT:-unknown}" --command "bash benchmarks/run_attention_gpu.sh" \
  2>&1 | tee "$OUT/bench.log"
