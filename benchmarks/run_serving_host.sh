#!/usr/bin/env bash
# Issue 5 on a many-core host (no GPU needed): the router's added latency, with the client, the
# router, the passthrough control and the tiny CPU shard each pinned to their own cores, so none
# of them waits for a core another one holds (the 2-core VM cannot separate them).
#
#   OUT=/tmp/serving bash benchmarks/run_serving_host.sh
#
# Two runs of benchmarks.bench_serving --spawn-tiny, each with a hard time limit: the 1-token
# pairs (direct vs each proxy: the router, the grpc.aio passthrough, the thread-based one) and
# the open loop (requests dealt in turn straight to the shard and through each proxy). Writes
# $OUT/serving_host_paired.json, $OUT/serving_host_open_loop.json, their logs and $OUT/host.txt
# (nproc, CPU model, layout). About 230 s; at most ~280 s. Knobs (environment): PAIRS, REQUESTS,
# RATE, REPEATS, COMMIT, and CLIENT_CPUS ROUTER_CPUS PASSTHROUGH_CPUS THREADED_CPUS SHARD_CPUS
# (taskset lists; by default chosen from nproc, unpinned below 4 cores).
set -uo pipefail
OUT=${OUT:-/tmp/serving_host}
mkdir -p "$OUT"
rm -f "$OUT"/serving_host_*.json  # the summary below must not report an earlier run's files
export PYTHONUNBUFFERED=1
started=$(date +%s)

# The carried wheels (grpcio 1.85 and friends) where this Python takes them; elsewhere (a CPU
# dev machine with another Python) the installed packages, if the stubs accept them.
if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1; then
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "carried wheels not installed (see pip.log); using this Python's own packages"
  export PYTHONPATH=$PWD
fi
python3 -c "import protos.generate_pb2_grpc, protos.shard_pb2_grpc, structlog, prometheus_client
import grpc_health.v1.health, grpc_reflection.v1alpha.reflection, torch, safetensors, tokenizers, uvloop" \
  || { echo "missing or mismatched packages: cannot run"; exit 1; }

# The CPUs this process may use (a container's cpuset need not start at 0), by position.
read -ra cpus <<<"$(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
cores=${#cpus[@]}
pick() { local IFS=,; echo "${cpus[*]:$1:$2}"; }
if [ "$cores" -ge 12 ]; then
  # Two cores each for the grpc processes (event loop + grpc's poller thread), four for the
  # shard (engine thread, event loop, poller); the first two left to the system.
  layout=("$(pick 2 2)" "$(pick 4 2)" "$(pick 6 2)" "$(pick 8 4)" "$(pick 12 2)")
elif [ "$cores" -ge 4 ]; then
  # The router and the passthroughs share a core: fine for the 1-token pairs, which load one
  # at a time; in the open loop they load it together (the 12-core layout separates them).
  layout=("$(pick 0 1)" "$(pick 1 1)" "$(pick 1 1)" "$(pick 2 $((cores - 2)))" "$(pick 1 1)")
else
  layout=("" "" "" "" "")
fi
CLIENT_CPUS=${CLIENT_CPUS-${layout[0]}}
ROUTER_CPUS=${ROUTER_CPUS-${layout[1]}}
PASSTHROUGH_CPUS=${PASSTHROUGH_CPUS-${layout[2]}}
SHARD_CPUS=${SHARD_CPUS-${layout[3]}}
THREADED_CPUS=${THREADED_CPUS-${layout[4]}}
if ! command -v taskset >/dev/null; then
  echo "no taskset here: running unpinned"
  CLIENT_CPUS="" ROUTER_CPUS="" PASSTHROUGH_CPUS="" SHARD_CPUS="" THREADED_CPUS=""
fi
{
  echo "nproc: $cores usable ($(nproc --all) in the machine): ${cpus[*]}"
  grep -m1 'model name' /proc/cpuinfo
  echo "client=${CLIENT_CPUS:-any} router=${ROUTER_CPUS:-any}" \
    "passthrough=${PASSTHROUGH_CPUS:-any} threaded=${THREADED_CPUS:-any} shard=${SHARD_CPUS:-any}"
  command -v lscpu >/dev/null && lscpu
} >"$OUT/host.txt"
head -3 "$OUT/host.txt"

pins=()
[ -n "$ROUTER_CPUS" ] && pins+=(--router-cpus "$ROUTER_CPUS")
[ -n "$PASSTHROUGH_CPUS" ] && pins+=(--passthrough-cpus "$PASSTHROUGH_CPUS")
[ -n "$SHARD_CPUS" ] && pins+=(--shard-cpus "$SHARD_CPUS")
[ -n "$THREADED_CPUS" ] && pins+=(--threaded-cpus "$THREADED_CPUS")
client=()
[ -n "$CLIENT_CPUS" ] && client=(taskset -c "$CLIENT_CPUS")

# One bench run: mode, time limit in seconds, extra arguments. SIGINT lets the benchmark stop
# the processes it spawned; a hung one is killed 10 s later.
bench() {
  local mode=$1 limit=$2 name=${1/-/_}
  shift 2
  timeout --signal=INT --kill-after=10 "$limit" "${client[@]}" python3 -m benchmarks.bench_serving \
    --spawn-tiny --modes "$mode" "${pins[@]}" --commit "${COMMIT:-unknown}" \
    --out "$OUT/serving_host_$name.json" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$mode: rc=$rc after $(($(date +%s) - started)) s"
  [ $rc -eq 0 ] || grep -v '"event"' "$OUT/$name.log" | tail -15
}
bench paired 100 --pairs "${PAIRS:-800}"
bench open-loop 160 --requests "${REQUESTS:-240}" --rate "${RATE:-8}" --repeats "${REPEATS:-4}" \
  --output-tokens 16:48

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("paired", "open_loop"):
    path = out / f"serving_host_{name}.json"
    if not path.exists():
        print(f"{name}: no results")
        continue
    results = json.loads(path.read_text())["results"]
    for proxy, r in results.get("sequential_1_token", {}).items():
        print(
            f"1-token pairs, {proxy}: direct p50 {r['ttft_ms_direct']['p50']} ms, "
            f"added p50 {r['added_ttft_ms']['p50']} ms p90 {r['added_ttft_ms']['p90']} ms, "
            f"proxy CPU {r['proxy_cpu_ms_per_request']} ms/request"
        )
    if "open_loop" in results:
        loop = results["open_loop"]
        print(f"open loop: TTFT p50 direct {loop['shard_direct']['ttft_ms']['p50']} ms")
        for proxy in ("router", "passthrough", "threaded"):
            print(
                f"  {proxy}: TTFT p50 {loop[f'through_{proxy}']['ttft_ms']['p50']} ms, "
                f"added {json.dumps(loop[f'{proxy}_added_ms'])}"
            )
EOF
echo "total: $(($(date +%s) - started)) s"
