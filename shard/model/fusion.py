"""torch.compile of the elementwise chains between the GEMMs (RMSNorm, RoPE, SwiGLU).

Eagerly each chain is 5-10 kernels; a 7B decode step runs about 1,500 launches, and at batch 1
their fixed cost is as large as reading the weights. Compiled, each chain is one fused kernel.
On by default (`--compile off` runs them eagerly: -24% decode tokens/s at 7B batch 32 on an
H200, benchmarks/NOTES.md); only CUDA tensors take the compiled path, so the CPU
reference path never changes. Where compiling fails (no C compiler, no Triton for the GPU) the
chain runs eagerly, with one warning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import structlog
import torch

log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., object])

_enabled = False


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


def elementwise(fn: F) -> F:
    """`fn` itself, or its compiled version (built on first use) for CUDA tensors when enabled."""
    compiled: Callable[..., object] | None = None
    broken = False

    @functools.wraps(fn)
    def run(x: torch.Tensor, *args: object) -> object:
        nonlocal compiled, broken
        if broken or not (_enabled and x.is_cuda):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            try:
                return compiled(x, *args)  # the first call compiles
            except Exception as e:  # whatever the compiler lacks: stay correct, run eagerly
                broken = True
                log.warning("torch.compile failed: running eagerly", fn=fn.__name__, error=str(e))
                return fn(x, *args)
        return compiled(x, *args)

    return run  # type: ignore[return-value]
