"""KV append and decode attention over the paged KV cache.

Semantics (the CPU reference below is the oracle for any faster backend):
- `kv_append(k_cache, v_cache, k, v, slots)`: for each row t, writes k[t], v[t] ([n_kv, d]) to
  page `slots[t] // page_size`, offset `slots[t] % page_size` of k_cache / v_cache
  ([pages, page_size, n_kv, d]).
- `paged_decode_attention(out, q, k_cache, v_cache, block_tables, context_lens, scale)`: for each
  request b, one query q[b] [n_q, d] attends to the first context_lens[b] cached tokens whose pages
  are block_tables[b] ([max_pages] int32, in order); GQA maps query head h to kv head
  h // (n_q // n_kv). Writes out[b] [n_q, d].
"""

from __future__ import annotations

import torch


def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Scatters new keys/values [T, n_kv, d] into their cache slots [T] int64."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> None:
    """out [B, n_q, d] = attention of q [B, n_q, d] over each request's paged context."""
    batch, n_q, d = q.shape
    n_kv = k_cache.shape[2]
    pages = block_tables.long()
    keys = k_cache[pages].flatten(1, 2)  # [B, max_pages * page_size, n_kv, d]
    values = v_cache[pages].flatten(1, 2)
    group = n_q // n_kv
    qg = q.float().view(batch, n_kv, group, d)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, keys.float()) * scale
    span = torch.arange(keys.shape[1], device=q.device)
    valid = span.view(1, -1) < context_lens.view(-1, 1)  # [B, S]
    scores = scores.masked_fill(~valid.view(batch, 1, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1)
    result = torch.einsum("bkgs,bskd->bkgd", probs, values.float())
    out.copy_(result.reshape(batch, n_q, d).to(out.dtype))
