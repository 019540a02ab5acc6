"""The collectives of a tensor-parallel decoder stack, run SPMD by every rank: torch.distributed
calls per decoder layer with and without LoRA, NCCL kernels (gloo ranges on a CPU) in a profiler
trace, and the forward's time."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections import Counter
from collections.abc import Callable
from functools import partial

import torch

from benchmarks.timing import median_ms
from benchmarks.workloads import decode_step
from shard.config import parse_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# torch.distributed calls counted: every collective shard.parallel.group can make.
COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast")


def count_collectives(rank: int, argv: list[str], adapters: list[str]) -> dict:
    """Builds this rank's slice of the stack and runs one eager decode forward of 32 rows on the
    base model and one with the rows spread over `adapters`: torch.distributed calls per decoder
    layer (forward hooks say which layer is running), NCCL kernels in a profiler trace, and the
    forward's median time."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from shard.compose import build_rank, rank_device
    from shard.parallel.group import TPGroup, destroy, init_group

    cfg = parse_config(argv, env={})
    group = init_group(rank, cfg.tp, rank_device(cfg, TPGroup(rank, cfg.tp)), cfg.tp_timeout_s)
    torch.set_grad_enabled(False)
    state = build_rank(cfg, group)
    device = state.runner.device
    for name in adapters:
        if (err := state.adapters.preload(name, pin=True, timeout_s=120)) is not None:
            raise err
    where = ["outside"]
    calls: Counter[tuple[str, str]] = Counter()

    def counting(op: str, fn: Callable) -> Callable:
        def wrapper(*a, **kw):
            calls[(where[0], op)] += 1
            return fn(*a, **kw)

        return wrapper

    for op in COUNTED:
        if hasattr(dist, op):
            setattr(dist, op, counting(op, getattr(dist, op)))
    layers = state.runner.model.layers
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, f"layer{i}"))
        layer.register_forward_hook(lambda *_: where.__setitem__(0, "outside"))
    report: dict = {"layers": len(layers)}
    logits = {}
    for label, rows in (
        ("base", [""] * 32),
        ("lora", [adapters[i % len(adapters)] for i in range(32)]),
    ):
        step, pages = decode_step(state.kv, state.adapters.weights, rows, 128)
        state.runner.forward(step)  # warm-up
        sync(device)
        calls.clear()
        logits[label] = state.runner.forward(step).float().cpu()
        sync(device)
        per_layer = [
            {op: n for (w, op), n in calls.items() if w == f"layer{i}"} for i in range(len(layers))
        ]
        outside = {op: n for (w, op), n in calls.items() if w == "outside"}
        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            state.runner.forward(step)
            sync(device)
        # NCCL kernels on a GPU; on a CPU, gloo's profiler ranges stand in for them.
        kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        kernels = Counter(
            e.name
            for e in prof.events()
            if e.device_type == kind and ("nccl" if cuda else "gloo:") in e.name.lower()
        )
        report[label] = {
            "collectives_per_layer": per_layer,
            "collectives_outside_layers": outside,
            "nccl_kernels": dict(kernels),
            "nccl_kernels_total": sum(kernels.values()),
            "forward_ms": median_ms(partial(state.runner.forward, step), device, reps=10),
        }
        state.kv.pool.release(pages)
    report["lora_changes_logits"] = not torch.allclose(logits["base"], logits["lora"])
    report["lora_adds_collectives"] = (
        report["lora"]["collectives_per_layer"] != report["base"]["collectives_per_layer"]
        or report["lora"]["nccl_kernels_total"] != report["base"]["nccl_kernels_total"]
    )
    destroy(group)
    return report


def stack_main(rank: int, argv: tuple[str, ...], adapters: list[str], out: mp.Queue) -> None:
    """One rank of the SPMD 70B-shaped stack: the same decode forward on both ranks."""
    try:
        out.put((rank, count_collectives(rank, list(argv), adapters)))
    except BaseException:
        out.put((rank, {"error": traceback.format_exc()[-3000:]}))
