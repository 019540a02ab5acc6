"""Self-attention over the paged KV cache: decode rows through the paged kernel, the rows of all
prefill chunks through one call of torch's fused attention over their gathered pages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shard.model.forward_meta import ForwardMeta
from shard.ops.attention import kv_append, paged_decode_attention


class PagedAttention(nn.Module):
    """softmax(q k^T * scale) v with GQA, reading keys and values from the layer's KV pages."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: ForwardMeta,
    ) -> torch.Tensor:
        """q [T, n_q, d], k/v [T, n_kv, d]; caches [pages, page_size, n_kv, d] -> [T, n_q, d]."""
        kv_append(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            paged_decode_attention(
                out[:nd], q[:nd], k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale
            )
        if meta.prefill_causal:
            # One fresh prompt: its own keys, causally; GQA in the kernel (flash on CUDA).
            attn = F.scaled_dot_product_attention(
                q[nd:].transpose(0, 1)[None],
                k[nd:].transpose(0, 1)[None],
                v[nd:].transpose(0, 1)[None],
                is_causal=True,
                scale=self.scale,
                enable_gqa=True,
            )
            out[nd:] = attn[0].transpose(0, 1)
        elif meta.prefill_mask is not None:
            self._prefill(out[nd:], q[nd:], k_cache, v_cache, meta)
        return out

    def _prefill(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: ForwardMeta,
    ) -> None:
        """Every prefill row at once: q [N_p, n_q, d] over the gathered pages of all chunks,
        masked to each row's own request and causal position (ForwardMeta.prefill_mask). A KV
        head's query heads are stacked as rows of one [group * N_p, d] query, so the call reads
        each key and value once per KV head, with no copy per query head."""
        n, d = q.shape[0], self.head_dim
        group = self.num_heads // self.num_kv_heads
        pages = meta.prefill_pages
        keys = k_cache[pages].flatten(0, 1).transpose(0, 1)  # [n_kv, S, d]
        values = v_cache[pages].flatten(0, 1).transpose(0, 1)
        queries = q.transpose(0, 1).reshape(self.num_kv_heads, group * n, d)
        # 4-d [1, heads, rows, d] inputs: the fused kernels take no other.
        attn = F.scaled_dot_product_attention(
            queries[None], keys[None], values[None], attn_mask=meta.prefill_mask, scale=self.scale
        )
        out.copy_(attn[0].reshape(self.num_heads, n, d).transpose(0, 1))
