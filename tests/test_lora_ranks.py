"""The LoRA rank classes of shard/adapters/lora_ranks.py are the kernels' (csrc/): every kernel
instantiation, the dispatch in ops.cpp and its error message agree with the Python list."""

from __future__ import annotations

import re
from pathlib import Path

from shard.adapters.lora_ranks import MAX_RANK, RANK_CLASSES

CSRC = Path(__file__).resolve().parents[1] / "csrc"
DTYPES = ("__half", "__nv_bfloat16")


def _instantiated(kernel: str) -> dict[str, list[int]]:
    """The ranks of each dtype's explicit instantiations of `kernel` in csrc/*.cu, as
    `MACRO(dtype, rank)` lines of a macro that expands to `template ... kernel<T, R>(...)`."""
    found: dict[str, list[int]] = {}
    for path in sorted(CSRC.glob("*.cu")):
        text = path.read_text()
        for macro in re.findall(rf"#define (\w+)\(T, R\)\s*\\\s*template \w+ {kernel}<T, R>", text):
            for dtype, rank in re.findall(rf"^{macro}\((\w+), (\d+)\)$", text, re.M):
                found.setdefault(dtype, []).append(int(rank))
    return found


def _dispatch() -> tuple[list[int], list[int], int]:
    """From ops.cpp's rank dispatch: the bounds tested in order, the ranks launched, and the
    largest rank its error message says is served."""
    ops = (CSRC / "ops.cpp").read_text()
    body = re.search(r"cudaError_t dispatch_rank\(.*?\n\}", ops, re.S)
    assert body, "csrc/ops.cpp: no dispatch_rank function"
    bounds = [int(r) for r in re.findall(r"r_max <= (\d+)", body[0])]
    launched = [int(r) for r in re.findall(r"Launch<T, (\d+)>", body[0])]
    said = re.search(r'"[^"]*rank <= (\d+)\)"', ops)
    assert said, "csrc/ops.cpp: the no-kernel message names no largest rank"
    return bounds, launched, int(said[1])


def test_the_kernels_are_instantiated_for_every_rank_class_and_dtype() -> None:
    for kernel in ("sgmv_shrink", "sgmv_expand"):
        found = _instantiated(kernel)
        assert found == {dtype: list(RANK_CLASSES) for dtype in DTYPES}, kernel


def test_ops_dispatches_ranks_to_the_classes_and_refuses_above_the_last() -> None:
    bounds, launched, said = _dispatch()
    assert list(RANK_CLASSES) == sorted(set(RANK_CLASSES))  # the dispatch takes the first fit
    assert bounds == list(RANK_CLASSES)
    assert launched == list(RANK_CLASSES)
    assert said == MAX_RANK == RANK_CLASSES[-1]
