"""Start router and shard processes on loopback ports for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from router.local_process import wait_serving as probe_serving

REPO = Path(__file__).resolve().parent.parent


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORAFLEET_LOG_FORMAT": "json"}
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_serving(address: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    if (why := probe_serving(address, proc, timeout)) is not None:
        raise RuntimeError(f"{why}:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def shard_args(tiny, port: int, *extra: str) -> list[str]:
    return [
        "shard",
        "--model",
        str(tiny.model_dir),
        "--adapters",
        str(tiny.adapters_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--page-size",
        "4",
        *extra,
    ]


def run_benchmark(module: str, args: list[str], out: Path, timeout: float) -> dict:
    """Runs `python -m benchmarks.<module> *args` (which writes `out`); returns out's JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())
