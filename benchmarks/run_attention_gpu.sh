#!/usr/bin/env bash
# One device call for the paged-attention part of issue 4: build the extension, run the GPU
# tests of tests/test_attention.py (both unroll variants), run the benchmark, then time our
# kernel alone under the A/B switches. Logs and JSON land in $OUT.
# Needs .whl/ (structlog) carried beside the tree; COMMIT names the commit measured.
set -uo pipefail
OUT=${OUT:-/tmp/attention_out}
source "$(dirname "$0")/gpu_setup.sh"
for unroll in 2 1; do
  LORAFLEET_ATTN_UNROLL=$unroll python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short \
    tests/test_attention.py >>"$OUT/tests.log" 2>&1
  echo "tests (unroll $unroll) rc=$?"; tail -3 "$OUT/tests.log"
done
bench() {  # bench NAME [--ours-only]
  python3 -m benchmarks.bench_attention --out "$OUT/$1.json" --commit "${COMMIT:-unknown}" \
    --command "bash benchmarks/run_attention_gpu.sh" "${@:2}" 2>&1 | tee -a "$OUT/bench.log"
}
bench attention_bench
LORAFLEET_ATTN_L2_PREFETCH=1 bench u2_prefetch --ours-only
LORAFLEET_ATTN_UNROLL=1 bench u1_no_prefetch --ours-only
LORAFLEET_ATTN_UNROLL=1 LORAFLEET_ATTN_L2_PREFETCH=1 bench u1_prefetch --ours-only
