"""Builds the CUDA extension of csrc/ with ``torch.utils.cpp_extension.load`` (ninja), once per
process; the build directory caches objects across processes.

``python -m shard.ops.build`` (``make kernels``) builds it ahead of time.
"""

from __future__ import annotations

import functools
import os
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
CUDA_FLAGS = ("-O3", "-std=c++17", "--threads=2", "-lineinfo")
# LORAFLEET_SM80=1 makes the kernels take their sm_80 launch paths (csrc/sgmv_common.cuh). The
# build then holds only compute_80 PTX, which the driver compiles for the GPU at hand: a Hopper
# GPU runs the device code written for sm_80 (__CUDA_ARCH__ == 800), the one way to run it
# where no Ampere GPU is lent. It builds under its own name, so both builds stay cached.
SM80_PTX = ("-gencode=arch=compute_80,code=compute_80",)


def build_target() -> tuple[str, tuple[str, ...]]:
    """(extension name, nvcc flags) of the build this process loads."""
    if os.environ.get("LORAFLEET_SM80"):
        return f"{NAME}_sm80_ptx", (*CUDA_FLAGS, *SM80_PTX)
    return NAME, (*CUDA_FLAGS, *GENCODE)


@functools.cache
def load_extension(verbose: bool = False) -> None:
    """Compiles (if stale) and loads the extension, registering ``torch.ops.lorafleet``."""
    from torch.utils.cpp_extension import load

    if not torch.cuda.is_available():
        raise RuntimeError("the lorafleet CUDA kernels need a CUDA build of torch and a GPU")
    sources = [str(CSRC / s) for s in SOURCES]
    name, cuda_flags = build_target()
    log.info("kernels.build.start", name=name, sources=list(SOURCES))
    start = time.perf_counter()
    load(
        name=name,
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=list(cuda_flags),
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=verbose,
    )
    log.info("kernels.build.done", name=name, seconds=round(time.perf_counter() - start, 1))


def ops():  # the torch.ops.lorafleet namespace, once the extension is loaded
    load_extension()
    return torch.ops.lorafleet


def main() -> None:
    load_extension(verbose=True)


if __name__ == "__main__":
    main()
