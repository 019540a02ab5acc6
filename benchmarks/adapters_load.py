"""The adapter benchmark's load side: PEFT folders of one 7B-shaped adapter, one adapter's
disk -> host -> device load timed through the real `AdapterCache`, and a simulated copy latency
that lets a CPU run queue like a GPU's copy stream."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.adapters_forward import MODULES
from shard.adapters.cache import AdapterCache
from shard.adapters.tiers import HostCopy, Resident
from shard.model.config import ModelConfig


def write_adapters(root: Path, cfg: ModelConfig, count: int, rank: int) -> list[str]:
    """`count` PEFT folders of one r`rank` adapter over all 7 projections (bf16): one weights
    file, hard-linked, so each id is a distinct cache entry of the same size."""
    tensors = {}
    for layer in range(cfg.num_layers):
        for m in MODULES:
            inp, out = cfg.projection_shape(m)
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inp, dtype=torch.bfloat16) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, dtype=torch.bfloat16) * 0.01
    weights = root / "weights.safetensors"
    save_file(tensors, weights)
    conf = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": MODULES}
    conf["base_model_name_or_path"] = cfg.name
    ids = []
    for n in range(count):
        folder = root / f"a{n:03d}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(conf))
        os.link(weights, folder / "adapter_model.safetensors")
        ids.append(folder.name)
    return ids


def drop_page_cache(path: Path) -> bool:
    """Asks the kernel to forget `path`'s cached pages (best effort, no root needed), so the
    next read comes from the disk; False where the platform has no posix_fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def through_cache(cache: AdapterCache, adapter_id: str) -> dict[str, float]:
    """One adapter disk -> device through the cache (LoadAdapter's path), with its stages from
    the cache's own histograms: read + validate + pack into pinned memory, then the copy."""

    def stage_sum(stage: str) -> float:
        name = "lorafleet_shard_adapter_load_seconds_sum"
        return metrics.registry.get_sample_value(name, {"stage": stage}) or 0.0

    metrics = cache.metrics
    assert metrics is not None
    before = {s: stage_sum(s) for s in ("disk_to_host", "host_to_gpu")}
    start = time.perf_counter()
    assert cache.preload(adapter_id, False, 120) is None
    total = time.perf_counter() - start
    return {
        "disk_to_gpu_s": total,  # includes the preload's 2 ms residency polls
        "disk_to_host_s": stage_sum("disk_to_host") - before["disk_to_host"],
        "host_to_gpu_s": stage_sum("host_to_gpu") - before["host_to_gpu"],
    }


def load_times(cache: AdapterCache, ids: list[str], weights: Path, repeats: int) -> dict:
    """Disk -> device through the cache for one adapter read from the disk (its file dropped
    from the page cache first) and one read from the page cache (the same bytes: the ids share
    one hard-linked file); then the bare host -> device copy of the packed, pinned adapter,
    timed with CUDA events. The cache must count in metrics of its own."""
    dropped = drop_page_cache(weights)
    out: dict = {"page_cache_dropped": dropped, "cold": through_cache(cache, ids[0])}
    out["page_cache"] = through_cache(cache, ids[1])
    host = cache._host[cache.versions.current[ids[0]]]  # the packed host copy the cache moves
    out["bytes"] = host.flat.numel()
    if cache.device.type != "cuda":
        return out
    stream = torch.cuda.Stream(cache.device)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            begin.record(stream)
            host.flat.to(cache.device, non_blocking=True)
            end.record(stream)
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000)
    out["host_to_gpu_s_median"] = statistics.median(times)
    out["host_to_gpu_s_min"] = min(times)
    out["host_to_gpu_GBps"] = host.flat.numel() / statistics.median(times) / 1e9
    return out


class SimulatedCopy:
    """A host -> device copy that takes `seconds` after the ones queued before it (one copy
    stream), as a CUDA event would report it: `query` polls, `wait` orders the compute after
    it (here: the engine thread sleeps, as the GPU's compute stream would stall)."""

    def __init__(self, done_at: float) -> None:
        self.done_at = done_at

    def query(self) -> bool:
        return time.perf_counter() >= self.done_at

    def wait(self, stream: None = None) -> None:
        time.sleep(max(0.0, self.done_at - time.perf_counter()))


def simulate_copies(cache: AdapterCache, copy_s: float) -> None:
    """Makes the cache's CPU copies take the GPU's copy latency (`--sim-copy-ms`), one after
    the other as on one copy stream."""
    copy_in = cache._to_device
    free_at = 0.0

    def slow(key: str, host: HostCopy) -> Resident:
        nonlocal free_at
        res = copy_in(key, host)
        free_at = max(time.perf_counter(), free_at) + copy_s
        res.ready, res.source = SimulatedCopy(free_at), host  # type: ignore[assignment]
        return res

    cache._to_device = slow
