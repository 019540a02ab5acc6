"""Optional torch.compile of the elementwise chains between the GEMMs (RMSNorm, RoPE, SwiGLU).

Eagerly each chain is 5-10 kernels; a 7B decode step runs about 1,500 launches, and at batch 1
their fixed cost is as large as reading the weights. Compiled, each chain is one fused kernel.
Off by default (`--compile on`); only CUDA tensors take the compiled path, so the CPU reference
path never changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])

_enabled = False


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


def elementwise(fn: F) -> F:
    """`fn` itself, or its compiled version (built on first use) for CUDA tensors when enabled."""
    compiled: Callable[..., object] | None = None

    @functools.wraps(fn)
    def run(x: torch.Tensor, *args: object) -> object:
        nonlocal compiled
        if not (_enabled and x.is_cuda):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(x, *args)

    return run  # type: ignore[return-value]
