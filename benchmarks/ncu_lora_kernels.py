"""The LoRA kernels of one Llama-7B decode layer (batch 32, 32 distinct r=16 adapters, each
projection group as the model runs it) or one decode attention call (batch 32, context 272), run
eagerly 20 times, for Nsight Compute to profile. Run it under ncu, e.g.::

    ncu --clock-control none --cache-control all -k regex:'shrink|expand' --launch-skip 8 \
        --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats python3 -m benchmarks.ncu_lora_kernels down

Parts: qkv, o, gateup, down (one shrink + one overwriting expand each) and attn.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.bench_attention import Case
from benchmarks.bench_sgmv import Batch
from shard.ops.sgmv import sgmv_expand, sgmv_shrink

ROWS = 32
RANK = 16
# part -> (h_in, output width of each projection of the group)
GROUPS = {
    "qkv": (4096, (4096, 4096, 4096)),
    "o": (4096, (4096,)),
    "gateup": (4096, (11008, 11008)),
    "down": (11008, (4096,)),
}


def lora_group(h_in: int, widths: tuple[int, ...]) -> Callable[[], None]:
    """One shrink and one overwriting expand of a projection group, Distinct adapters."""
    batches = [Batch(list(range(ROWS)), [RANK], h_in, w) for w in widths]
    a_ptrs = torch.stack([b.a_ptrs for b in batches])
    b_ptrs = torch.stack([b.b_ptrs for b in batches])
    ranks = torch.stack([b.ranks for b in batches])
    scales = torch.stack([b.scales for b in batches])
    x, seg_starts = batches[0].x, batches[0].seg_starts
    v = torch.empty(ROWS, RANK * len(widths), device="cuda", dtype=x.dtype)
    y = torch.empty(ROWS, sum(widths), device="cuda", dtype=x.dtype)

    def run() -> None:
        sgmv_shrink(v, x, a_ptrs, seg_starts, ranks, 0)
        sgmv_expand(y, v, b_ptrs, seg_starts, ranks, scales, 0, widths, accumulate=False)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=(*GROUPS, "attn"))
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.part == "attn":
        run = Case(32, 32, 128, ROWS, 272).ours(8)[0]
    else:
        run = lora_group(*GROUPS[args.part])
    for _ in range(20):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
