#!/usr/bin/env bash
# One device call for issue 3: build the extension, run the GPU tests, run the benchmark.
# Logs and the JSON land in $OUT. Needs .whl/ (structlog) carried beside the tree.
set -uo pipefail
OUT=${OUT:-/tmp/sgmv_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)
python3 -m shard.ops.build >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(($(date +%s) - start)) s"
python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_sgmv.py >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
python3 -m benchmarks.bench_sgmv --out "$OUT/sgmv_bench.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_sgmv_gpu.sh" 2>&1 | tee "$OUT/bench.log"
