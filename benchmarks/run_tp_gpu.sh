#!/usr/bin/env bash
# One device call for issue 7 on a host with 2 GPUs (e.g. 2 x H100 or H200): build the kernels,
# run bench_tp (tiny TP=1 == TP=2 tokens, 70B-shaped stack collectives, 7B decode TP=1 vs TP=2).
# Logs and the JSON land in $OUT. Needs .whl/ (structlog and friends) carried beside the tree.
# Extra arguments go to bench_tp (e.g. --parts decode --eager).
set -uo pipefail
OUT=${OUT:-/tmp/tp_out}
# NVLink multicast stays off (shared host: see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source "$(dirname "$0")/gpu_setup.sh"
nvidia-smi topo -m | tee "$OUT/topo.txt"
python3 -m benchmarks.bench_tp --out "$OUT/tp_${DEVICE_TAG}.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_tp_gpu.sh $*" "$@" >"$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -v '"event"\|\[info \|\[debug\|Writing model' "$OUT/bench.log" | cut -c1-400 | tail -40
