#!/usr/bin/env bash
# One device call for issue 3: build the extension, run the SGMV GPU tests, run the benchmark.
# Logs and the JSONs land in $OUT. Needs .whl/ (structlog) carried beside the tree. Sized for a
# 300 s call: each step has its own timeout, so a hang still leaves the others' logs.
set -uo pipefail
OUT=${OUT:-/tmp/sgmv_out}
source "$(dirname "$0")/gpu_setup.sh"
# The one-launch kernel is opt-in (LORAFLEET_FUSED=1): its tests run with it, then without.
LORAFLEET_FUSED=1 timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -x \
  tests/test_sgmv_fused.py >"$OUT/tests_fused.log" 2>&1
echo "fused tests (one launch) rc=$?"; tail -12 "$OUT/tests_fused.log"
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_sgmv_fused.py \
  >"$OUT/tests_fused_default.log" 2>&1
echo "fused tests (default: two launches) rc=$?"; tail -3 "$OUT/tests_fused_default.log"
timeout 50 python3 -m benchmarks.bench_sgmv --out "$OUT/sgmv_bench.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_sgmv_gpu.sh" 2>&1 | tee "$OUT/bench.log"
LORAFLEET_FUSED=1 timeout 50 python3 -m benchmarks.bench_sgmv --out "$OUT/sgmv_bench_fused.json" \
  --commit "${COMMIT:-unknown}" --command "LORAFLEET_FUSED=1 bash benchmarks/run_sgmv_gpu.sh" \
  2>&1 | tee "$OUT/bench_fused.log"
timeout 45 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_sgmv.py tests/test_sgmv_groups.py \
  -k "graph or rejects or (matches_reference and (1- or 64-))" >"$OUT/tests.log" 2>&1
echo "shrink/expand tests rc=$?"; tail -4 "$OUT/tests.log"
LORAFLEET_FUSED=1 LORAFLEET_SM80=1 timeout 20 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short \
  tests/test_sgmv_fused.py -k "graph or identical" >"$OUT/tests_sm80.log" 2>&1
echo "sm80-path fused tests rc=$?"; tail -3 "$OUT/tests_sm80.log"
