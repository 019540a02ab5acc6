# Sourced by benchmarks/run_*_gpu.sh on the device, with OUT set: puts the carried wheels
# (structlog, grpcio 1.85 and friends; $WHL, default .whl) on PYTHONPATH, names the GPU in
# $OUT/gpu.txt and builds the kernels (log in $OUT/build.log), exiting on a failed build,
# unless SKIP_KERNELS is set.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${WHL:-.whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
# SKIP_KERNELS=1: a benchmark that runs no custom op saves the ~60 s build.
if [ -z "${SKIP_KERNELS:-}" ]; then
  start=$(date +%s)
  python3 -m shard.ops.build >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  echo "build: $(($(date +%s) - start)) s"
fi
