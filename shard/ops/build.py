"""Builds the CUDA extension of csrc/ with ``torch.utils.cpp_extension.load`` (ninja), once per
process; the build directory caches objects across processes.

``python -m shard.ops.build`` (``make kernels``) builds it ahead of time.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("ops.cpp", "sgmv_shrink.cu", "sgmv_expand.cu", "paged_attention.cu")
NAME = "lorafleet_ops"
# Ampere (sm_80) and Hopper with its arch-specific features (sm_90a).
GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
)
CUDA_FLAGS = ("-O3", "-std=c++17", "--threads=2", "-lineinfo", *GENCODE)


@functools.cache
def load_extension(verbose: bool = False) -> None:
    """Compiles (if stale) and loads the extension, registering ``torch.ops.lorafleet``."""
    from torch.utils.cpp_extension import load

    if not torch.cuda.is_available():
        raise RuntimeError("the lorafleet CUDA kernels need a CUDA build of torch and a GPU")
    sources = [str(CSRC / s) for s in SOURCES]
    log.info("kernels.build.start", name=NAME, sources=list(SOURCES))
    start = time.perf_counter()
    load(
        name=NAME,
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=list(CUDA_FLAGS),
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=verbose,
    )
    log.info("kernels.build.done", name=NAME, seconds=round(time.perf_counter() - start, 1))


def ops():  # the torch.ops.lorafleet namespace, once the extension is loaded
    load_extension()
    return torch.ops.lorafleet


def main() -> None:
    load_extension(verbose=True)


if __name__ == "__main__":
    main()
