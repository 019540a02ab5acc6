# Sourced by benchmarks/run_*_gpu.sh on the device, with OUT set: puts the carried wheels
# (structlog, grpcio 1.85 and friends; $WHL, default .whl, filled by fetch_wheels.sh) on
# PYTHONPATH, names the GPU in $OUT/gpu.txt, sets $DEVICE_TAG (e.g. h100) for result file names,
# and builds the kernels (log in $OUT/build.log), exiting on a failed build, unless SKIP_KERNELS
# is set.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${WHL:-.whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
# The GPU's model as results files are named (h100, h200, a100, ...), read off the device rather
# than written into each script; with several GPUs, e.g. h200x2.
DEVICE_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 |
  awk '{for (i = 1; i <= NF; i++) if ($i ~ /^[A-Z]+[0-9]+/) { t = tolower($i); sub(/-.*/, "", t); print t; exit }}')
DEVICE_TAG=${DEVICE_TAG:-gpu}
gpus=$(nvidia-smi -L | wc -l)
[ "$gpus" -gt 1 ] && DEVICE_TAG="${DEVICE_TAG}x$gpus"
export DEVICE_TAG
# SKIP_KERNELS=1: a benchmark that runs no custom op saves the ~60 s build.
if [ -z "${SKIP_KERNELS:-}" ]; then
  start=$(date +%s)
  python3 -m shard.ops.build >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  echo "build: $(($(date +%s) - start)) s"
fi
