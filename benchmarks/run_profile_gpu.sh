#!/usr/bin/env bash
# One device call: build the kernels, run the GPU-path tests (CUDA graphs, compiled chains,
# attention, sampling), then profile a 7B decode step (benchmarks/profile_decode.py).
# Logs and the JSON land in $OUT. Needs .whl/ carried beside the tree (see gpu_setup.sh).
set -uo pipefail
OUT=${OUT:-/tmp/profile_out}
source "$(dirname "$0")/gpu_setup.sh"
python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_gpu_path.py \
  tests/test_attention.py tests/test_sampling.py >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
python3 -m benchmarks.profile_decode --out "$OUT/profile_${DEVICE_TAG}.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_profile_gpu.sh" 2>&1 \
  | grep -v "eos_token_id\|adapter read\|decode graph captured" | tee "$OUT/profile.log"
