#!/usr/bin/env bash
# One device call for issue 4: build the kernels, run the GPU-path tests, run bench_textgen.
# Logs, the JSON and the plot land in $OUT. Needs .whl/ (structlog, grpcio 1.85 and friends:
# the image's grpcio is older than our generated stubs) carried beside the tree.
# Extra arguments go to bench_textgen (e.g. --batches 8,32).
set -uo pipefail
OUT=${OUT:-/tmp/textgen_out}
source "$(dirname "$0")/gpu_setup.sh"
tests=(tests/test_gpu_path.py)
[ -f tests/test_attention.py ] && tests+=(tests/test_attention.py)
python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short "${tests[@]}" >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
python3 -m benchmarks.bench_textgen --out "$OUT/textgen_${DEVICE_TAG}.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_textgen_gpu.sh $*" "$@" 2>&1 \
  | grep -v "eos_token_id\|adapter read\|adapter evicted\|decode graph captured" | tee "$OUT/bench.log"
# A/B: the same lorafleet runs at batch 32 with the elementwise chains eager (--compile off).
python3 -m benchmarks.bench_textgen --out "$OUT/textgen_${DEVICE_TAG}_eager.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_textgen_gpu.sh $*" --batches 1,32 --peft-batches "" --compile off 2>&1 \
  | grep -v "eos_token_id\|adapter read\|adapter evicted\|decode graph captured" | tee "$OUT/bench_eager.log"
