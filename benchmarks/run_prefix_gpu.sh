#!/usr/bin/env bash
# Issue 22 on one GPU: benchmarks.prefix_gpu, the prefix cache's time to first token with the
# cache off, then on, at the same load: a 7B-shaped dummy shard with 32 r16 adapters behind a
# router, every prompt a shared 1,000-token system prompt plus its own 16-64 tokens, 4 requests/s
# open loop for 30 s per run (a fresh shard each). The JSON lands in $OUT/prefix_${DEVICE_TAG}.json,
# the shards' and routers' logs in $OUT/logs. Needs .whl/ carried beside the tree (gpu_setup.sh).
#
#   OUT=/tmp/prefix_gpu bash benchmarks/run_prefix_gpu.sh [--rate 4] [--seconds 30]
#
# Expected on an H100 (not yet timed there): the kernel build (~1 min), writing the adapters,
# two shard starts with their decode-graph warm-up and two 30 s runs, about 4-5 minutes in all.
# Extra arguments go to prefix_gpu.
set -uo pipefail
OUT=${OUT:-/tmp/prefix_gpu}
source "$(dirname "$0")/gpu_setup.sh"
python3 -m benchmarks.prefix_gpu --out "$OUT/prefix_${DEVICE_TAG}.json" --logs "$OUT/logs" \
  --commit "${COMMIT:-unknown}" --command "bash benchmarks/run_prefix_gpu.sh $*" "$@" 2>&1 \
  | grep -v "eos_token_id\|adapter read\|decode graph captured" | tee "$OUT/prefix.log"
