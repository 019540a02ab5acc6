#!/usr/bin/env bash
# One device call for issue 3: build the extension, run the GPU tests, run the benchmark.
# Logs and the JSON land in $OUT. Needs .whl/ (structlog) carried beside the tree.
set -uo pipefail
OUT=${OUT:-/tmp/sgmv_out}
source "$(dirname "$0")/gpu_setup.sh"
# A failed TORCH_CHECK must raise, not crash: on a crash, show where (cuda-gdb debugs host code).
cat >/tmp/raise.py <<'PY'
import torch
from shard.ops import sgmv_shrink
dev = "cuda"
v = torch.empty(4, 256, dtype=torch.bfloat16, device=dev)
x = torch.randn(4, 64, dtype=torch.bfloat16, device=dev)
ptrs = torch.zeros(1, dtype=torch.int64, device=dev)
starts = torch.tensor([0, 4], dtype=torch.int32, device=dev)
ranks = torch.tensor([8], dtype=torch.int32, device=dev)
try:
    sgmv_shrink(v, x, ptrs, starts, ranks, 0)
except RuntimeError as e:
    print("raised as it should:", str(e).splitlines()[0])
PY
python3 /tmp/raise.py 2>&1 | tail -3
[ "${PIPESTATUS[0]}" = 0 ] || timeout 120 cuda-gdb -q -batch -ex run -ex bt --args python3 /tmp/raise.py 2>&1 | tail -40
python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_sgmv.py tests/test_sgmv_groups.py >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
# The bad-table checks again outside pytest: on a crash, where (v1 saw a segfault on a TORCH_CHECK).
python3 -c "from tests.test_sgmv_groups import BAD_GROUP_CALLS as s; print(s)" >/tmp/bad.py
python3 /tmp/bad.py 2>&1 | tail -3
[ "${PIPESTATUS[0]}" = 0 ] || timeout 120 cuda-gdb -q -batch -ex run -ex bt --args python3 /tmp/bad.py 2>&1 | tail -40
# The sm_80 launch paths (no PDL, no clusters) on this Hopper GPU: LORAFLEET_SM80=1.
LORAFLEET_SM80=1 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_sgmv.py tests/test_sgmv_groups.py \
  -k "matches_reference or graph or long_prefill" >"$OUT/tests_sm80.log" 2>&1
echo "sm80-path tests rc=$?"; tail -5 "$OUT/tests_sm80.log"
python3 -m benchmarks.bench_sgmv --out "$OUT/sgmv_bench.json" --commit "${COMMIT:-unknown}" \
  --command "bash benchmarks/run_sgmv_gpu.sh" 2>&1 | tee "$OUT/bench.log"
# The 7B step again with programmatic dependent launch off (A/B of that feature).
LORAFLEET_NO_PDL=1 python3 -c "from benchmarks.bench_sgmv import whole_step; print('no PDL:', whole_step())" \
  2>&1 | tee "$OUT/no_pdl.log"
