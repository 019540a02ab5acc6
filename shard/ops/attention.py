"""KV append and decode attention over the paged KV cache.

Semantics (the CPU reference below is the oracle for any faster backend):
- `kv_append(k_cache, v_cache, k, v, slots)`: for each row t, writes k[t], v[t] ([n_kv, d]) to
  page `slots[t] // page_size`, offset `slots[t] % page_size` of k_cache / v_cache
  ([pages, page_size, n_kv, d]). Every slot must be a slot of the cache: a CUDA graph's padding
  rows write to the KV cache's scratch page (shard/engine/decode_graphs.py), so no row is ever
  skipped and the reference needs no host sync to filter rows.
- `paged_decode_attention(out, q, k_cache, v_cache, block_tables, context_lens, scale)`: for each
  request b, one query q[b] [n_q, d] attends to the first context_lens[b] cached tokens whose pages
  are block_tables[b] ([max_pages] int32, in order); GQA maps query head h to kv head
  h // (n_q // n_kv). Writes out[b] [n_q, d]. Entries of block_tables[b] past the request's
  ceil(context_lens[b] / page_size) pages are never read (they may hold anything); a context
  longer than max_pages * page_size is cut there; a request with context_lens[b] == 0 (a padded
  row) gets zeros.

Shapes and dtypes: k, v [T, n_kv, d] and q, out [B, n_q, d] may be row-strided views (each row's
[heads, d] contiguous, e.g. column slices of a fused qkv output); slots [T] int64; block_tables
[B, max_pages] int32; context_lens [B] int32. Scores and sums accumulate in float32.

Backends: CUDA tensors run the kernels of ``csrc/`` where they apply (kv_append: rows of a
multiple of 16 bytes; attention: float16/bfloat16, d 64 or 128, page_size 16, n_q / n_kv <= 8);
other CUDA tensors and CPU tensors run the plain-torch reference. The kernels write into the given
outputs and allocate nothing, so a decode step can be captured in a CUDA graph. On sm_90 a long
context at small batch is split over a cluster of up to ``max_splits`` CTAs (flash-decoding),
merged through distributed shared memory; ``max_splits=1`` turns that off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shard.ops.build import ops as _ops

PAGE_SIZE = 16  # the kernels' page size
HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads per kv head the kernel serves
MAX_SPLITS = 8


def kv_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Scatters new keys/values [T, n_kv, d] into their cache slots [T] int64."""
    if k.is_cuda and _append_has_kernel(k_cache):
        _ops().kv_append(k_cache, v_cache, k, v, slots)
    else:
        kv_append_reference(k_cache, v_cache, k, v, slots)


def paged_decode_attention(
    out: Tensor,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    *,
    max_splits: int = MAX_SPLITS,
) -> None:
    """out [B, n_q, d] = attention of q [B, n_q, d] over each request's paged context."""
    if q.is_cuda and _decode_has_kernel(q, k_cache):
        _ops().paged_decode_attention(
            out, q, k_cache, v_cache, block_tables, context_lens, scale, max_splits
        )
    else:
        paged_decode_attention_reference(
            out, q, k_cache, v_cache, block_tables, context_lens, scale
        )


def kv_append_reference(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor
) -> None:
    """Plain-torch :func:`kv_append`."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_decode_attention_reference(
    out: Tensor,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
) -> None:
    """Plain-torch :func:`paged_decode_attention`."""
    batch, n_q, d = q.shape
    page_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    lens = context_lens.long().view(-1, 1)  # [B, 1]
    page_idx = torch.arange(block_tables.shape[1], device=q.device)
    # Entries past a request's pages may hold anything: read page 0 there, masked below.
    used = page_idx.view(1, -1) * page_size < lens  # [B, max_pages]
    pages = torch.where(used, block_tables.long(), 0)
    keys = k_cache[pages].flatten(1, 2)  # [B, max_pages * page_size, n_kv, d]
    values = v_cache[pages].flatten(1, 2)
    group = n_q // n_kv
    qg = q.float().view(batch, n_kv, group, d)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, keys.float()) * scale
    span = torch.arange(keys.shape[1], device=q.device)
    valid = span.view(1, -1) < lens  # [B, S]
    scores = scores.masked_fill(~valid.view(batch, 1, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1)
    probs = torch.where(lens.view(batch, 1, 1, 1) > 0, probs, 0.0)  # no context: zeros, not NaN
    # Masked values are zeroed too: garbage (even NaN) there must not reach the sum.
    values = values.float().masked_fill(~valid.view(batch, -1, 1, 1), 0.0)
    result = torch.einsum("bkgs,bskd->bkgd", probs, values)
    out.copy_(result.reshape(batch, n_q, d).to(out.dtype))


def _append_has_kernel(k_cache: Tensor) -> bool:
    return k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size() % 16 == 0


def _decode_has_kernel(q: Tensor, k_cache: Tensor) -> bool:
    n_q, d = q.shape[1], q.shape[2]
    n_kv = k_cache.shape[2]
    return (
        q.dtype in (torch.float16, torch.bfloat16)
        and d in HEAD_DIMS
        and k_cache.shape[1] == PAGE_SIZE
        and n_q % n_kv == 0
        and n_q // n_kv <= MAX_GROUP
    )
