"""The router's CPU for load tracking: one real router process against N simulated shards.

`benchmarks.sim_shards` serves every shard's WatchLoad and health on one port; the router dials
each at its own loopback address, as `--shard` flags. Once every shard is eligible (the
`lorafleet_router_shards` gauge), the router's CPU time (from /proc) is read over a window and
divided by the snapshots the shards sent in it: the router's whole cost of tracking a fleet,
gRPC and HTTP/2 included, per snapshot and in cores.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.serving_procs import cpu_seconds, launch, stop_all
from benchmarks.sim_shards import loopback_addresses
from router.local_process import free_port


def _gauge(metrics_url: str, name: str) -> float:
    try:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    except OSError:
        return -1.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return -1.0


def _sent(log: Path) -> int:
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["snapshots"] if lines else 0


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(
    shards: int,
    changes_per_s: float,
    window_s: float = 20.0,
    full_residency: bool = False,
    ready_timeout_s: float = 300.0,
) -> dict[str, object]:
    """Router CPU over `window_s` seconds with `shards` simulated shards changing load."""
    sim_port, router_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "LORAFLEET_LOG_FORMAT": "json"}
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    procs = []
    with tempfile.TemporaryDirectory(prefix="fleet-tracking-") as tmp:
        workdir = Path(tmp)
        try:
            sim_cmd = [sys.executable, "-m", "benchmarks.sim_shards", "--port", str(sim_port)]
            sim_cmd += ["--changes-per-s", str(changes_per_s)]
            sim_cmd += ["--full-residency"] if full_residency else []
            sim = launch(procs, workdir, "sim", None, sim_cmd, env)
            router_cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--http-port=0"]
            router_cmd += ["--port", str(router_port), "--metrics-port", str(metrics_port)]
            router_cmd += [f"--shard={a}" for a in loopback_addresses(shards, sim_port)]
            router = launch(procs, workdir, "router", None, router_cmd, env)
            start = time.monotonic()
            while _gauge(metrics_url, "lorafleet_router_shards") < shards:
                assert time.monotonic() - start < ready_timeout_s, "shards never all eligible"
                assert router.poll() is None and sim.poll() is None, "a process exited"
                time.sleep(0.5)
            ready_s = time.monotonic() - start
            time.sleep(3.0)  # let the start-up burst of first snapshots pass
            cpu0, sim_cpu0, sent0, t0 = (
                cpu_seconds(router.pid),
                cpu_seconds(sim.pid),
                _sent(workdir / "sim.log"),
                time.monotonic(),
            )
            time.sleep(window_s)
            seconds = time.monotonic() - t0
            router_cpu = cpu_seconds(router.pid) - cpu0
            sim_cpu = cpu_seconds(sim.pid) - sim_cpu0
            # The count is printed once a second: the window's count is within a second's worth.
            sent = _sent(workdir / "sim.log") - sent0
            eligible = _gauge(metrics_url, "lorafleet_router_shards")
            rss = _rss_mib(router.pid)
        finally:
            stop_all(procs)
    return {
        "shards": shards,
        "changes_per_s_per_shard": changes_per_s,
        "residency": "full lists" if full_residency else "deltas",
        "ready_s": round(ready_s, 1),
        "window_s": round(seconds, 1),
        "snapshots": sent,
        "snapshots_per_s": round(sent / seconds, 1),
        "router_cpu_s": round(router_cpu, 2),
        "router_cores": round(router_cpu / seconds, 3),
        "router_us_per_snapshot": round(router_cpu / max(1, sent) * 1e6, 1),
        "router_rss_mib": round(rss, 1),
        "shards_eligible_at_end": eligible,
        "simulator_cores": round(sim_cpu / seconds, 3),
    }
