#!/usr/bin/env bash
# One device call for issue 6: bench_adapters on one GPU. Measures one Llama-7B-shaped r16
# adapter (all 7 projections) disk -> GPU (from disk and from the page cache) and host -> GPU,
# and TTFT p50/p99 with a working set 4x the device adapter budget against warm TTFT. Writes
# $OUT/adapters_${DEVICE_TAG}.json (rewritten after each phase, so a hang keeps what was measured) and
# $OUT/adapters.log. Needs .whl/ (structlog, grpcio 1.85 and friends) carried beside the tree.
# The synthetic forward runs plain torch matmuls, so the kernel build is skipped. One attempt,
# bounded at BENCH_LIMIT_S (170 s) of benchmark. Extra arguments go to bench_adapters.
set -uo pipefail
OUT=${OUT:-/tmp/adapters_out}
SKIP_KERNELS=1
source "$(dirname "$0")/gpu_setup.sh"
start=$(date +%s)
timeout -k 10 "${BENCH_LIMIT_S:-170}" python3 -m benchmarks.bench_adapters \
  --out "$OUT/adapters_${DEVICE_TAG}.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_adapters_gpu.sh $*" "$@" 2>&1 \
  | grep -v "adapter read\|adapter evicted" | tee "$OUT/adapters.log"
rc=${PIPESTATUS[0]}
echo "bench_adapters rc=$rc after $(($(date +%s) - start)) s" | tee -a "$OUT/adapters.log"
exit "$rc"
