#!/usr/bin/env bash
# Issue 16 on one GPU: build the kernels, run the GPU-path tests (mixed steps and chunked prefill
# among them), then benchmarks.serving_gpu: the short workload's capacity curve through the
# router, the long workload, the mixed-step microbenchmark against the decode-only step and its
# floor (with a torch.profiler pass), and closed-batch decode at each rate's mean batch, in one
# run. The JSON and its plot land in $OUT. Needs .whl/ carried beside the tree (gpu_setup.sh).
#
#   OUT=/tmp/serving_gpu bash benchmarks/run_serving_gpu.sh [--rates 2,4,8,12,16] [--seconds 40]
#
# The defaults take about 9 minutes on an H100 (5 rates x 40 s, the long workload, the shard's
# start with graph warm-up, 12 mixed cases); extra arguments go to serving_gpu.
set -uo pipefail
OUT=${OUT:-/tmp/serving_gpu}
source "$(dirname "$0")/gpu_setup.sh"
python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_gpu_path.py \
  >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -15 "$OUT/tests.log"
python3 -m benchmarks.serving_gpu --out "$OUT/serving_${DEVICE_TAG}.json" --profile \
  --commit "${COMMIT:-unknown}" --command "bash benchmarks/run_serving_gpu.sh $*" "$@" 2>&1 \
  | grep -v "eos_token_id\|adapter read\|decode graph captured" | tee "$OUT/serving.log"
