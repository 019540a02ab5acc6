"""Timing and provenance helpers every benchmark shares: CUDA-graph and CUDA-event timers, the
device's copy bandwidth (the denominator of every floor), and the commit a result came from."""

from __future__ import annotations

import datetime
import math
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def time_graph(calls: list[Callable[[], None]], reps: int = 15) -> float:
    """Median microseconds per call of `calls` captured back to back in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:  # warm-up: lazy build, cuBLAS handles, allocator
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the capture allocates its own pool: return the warm-up's memory
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    """Median milliseconds of fn after 3 warm-up calls (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(5):
        start.record()
        for _ in range(5):
            dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3 / 5)
    return 2 * src.numel() * src.element_size() / best


def git_commit() -> str:
    """HEAD of the checkout (+dirty with local edits), or "unknown" outside one (pass --commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
    except OSError:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty else "")


def device_name(device: str, gpus: int | None = None) -> str:
    """A torch device ("cuda", "cuda:1", "cpu") as a results file names it: a GPU by its model,
    as "N x model" for a run over `gpus` of them."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return name if gpus is None else f"{gpus} x {name}"


def provenance(
    command: str,
    commit: str | None,
    bandwidth: float | None,
    device: str | None = "cuda",
    gpus: int | None = None,
) -> dict[str, object]:
    """The header of a results file: device (see `device_name`; None where it is not known
    here, e.g. a remote server's), date, commit, command, torch, copy bandwidth (None for a run
    that measures none)."""
    return {
        "device": device_name(device, gpus) if device else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or git_commit(),
        "command": command,
        "torch": torch.__version__,
        "copy_bandwidth_tbps": bandwidth / 1e12 if bandwidth else None,
    }
