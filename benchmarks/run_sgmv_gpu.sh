#!/usr/bin/env bash
# One device call for issue 3: build the extension, run the GPU tests, run the SGMV benchmark.
# Logs and the JSON land in $OUT. Needs .whl/ (structlog) carried beside the tree. Sized for a
# 500 s call: each step has its own timeout, so a hang still leaves the others' logs.
set -uo pipefail
OUT=${OUT:-/tmp/sgmv_out}
source "$(dirname "$0")/gpu_setup.sh"
# Every GPU test (not only the SGMV ones: this call proves the whole tree on the GPU).
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/ >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
# The sm_80 device code and launch paths (no PDL, no clusters) on this Hopper GPU: LORAFLEET_SM80=1
# builds compute_80 PTX only (its own build, JIT-compiled by the driver) and takes those paths.
start=$(date +%s)
LORAFLEET_SM80=1 timeout 150 python3 -m shard.ops.build >"$OUT/build_sm80.log" 2>&1
echo "sm80 PTX build rc=$? in $(($(date +%s) - start)) s"
LORAFLEET_SM80=1 timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short \
  tests/test_sgmv.py tests/test_sgmv_groups.py tests/test_attention.py >"$OUT/tests_sm80.log" 2>&1
echo "sm80 tests rc=$?"; tail -5 "$OUT/tests_sm80.log"
timeout 50 python3 -m benchmarks.bench_sgmv --out "$OUT/sgmv_bench.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_sgmv_gpu.sh" 2>&1 | tee "$OUT/bench.log"
