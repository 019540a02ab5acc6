#!/usr/bin/env bash
# One device call for issue 3: build the extension, run the SGMV GPU tests, run the benchmark.
# Logs and the JSON land in $OUT. Needs .whl/ (structlog) carried beside the tree. Sized for a
# 300 s call: each step has its own timeout, so a hang still leaves the others' logs.
set -uo pipefail
OUT=${OUT:-/tmp/sgmv_out}
source "$(dirname "$0")/gpu_setup.sh"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_sgmv.py \
  tests/test_sgmv_groups.py >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
# The sm_80 launch paths (no PDL, no clusters) on this Hopper GPU: LORAFLEET_SM80=1.
LORAFLEET_SM80=1 timeout 40 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short \
  tests/test_sgmv.py tests/test_sgmv_groups.py \
  -k "graph or long_prefill or (matches_reference and (1- or 64-))" >"$OUT/tests_sm80.log" 2>&1
echo "sm80-path tests rc=$?"; tail -5 "$OUT/tests_sm80.log"
timeout 50 python3 -m benchmarks.bench_sgmv --out "$OUT/sgmv_bench.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_sgmv_gpu.sh" 2>&1 | tee "$OUT/bench.log"
# The 7B step again with programmatic dependent launch off (A/B of that feature).
LORAFLEET_NO_PDL=1 timeout 30 python3 -c \
  "from benchmarks.bench_sgmv import whole_step; print('no PDL:', whole_step())" 2>&1 | tee "$OUT/no_pdl.log"
