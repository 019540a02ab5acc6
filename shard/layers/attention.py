"""Self-attention over the paged KV cache: decode rows through the paged kernel, prefill spans
through torch's fused attention over their gathered pages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shard.forward_meta import ForwardMeta
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
        for span in meta.prefills:
            keys = k_cache[span.pages].flatten(0, 1)[: span.context_len]  # [ctx, n_kv, d]
            values = v_cache[span.pages].flatten(0, 1)[: span.context_len]
            qs = q[span.start : span.end].transpose(0, 1)  # [n_q, n, d]
            n = span.end - span.start
            fresh = n == span.context_len
            mask = None
            if not fresh:
                # Queries are the last n positions of the context: causal with an offset.
                mask = torch.ones(n, span.context_len, dtype=torch.bool, device=q.device).tril(
                    span.context_len - n
                )
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [n_kv, ctx, d]
            group = self.num_heads // self.num_kv_heads
            if group > 1:
                # Expanded rather than enable_gqa=True: torch's flash kernel does not take GQA,
                # and its math fallback materialises [heads, n, ctx] scores (GBs for 4k prompts).
                keys = keys.repeat_interleave(group, dim=0)
                values = values.repeat_interleave(group, dim=0)
            # 4-d [1, heads, n, d] inputs: the flash and memory-efficient kernels take no other.
            attn = F.scaled_dot_product_attention(
                qs[None],
                keys[None],
                values[None],
                attn_mask=mask,
                is_causal=fresh,
                scale=self.scale,
            )
            out[span.start : span.end] = attn[0].transpose(0, 1)
        return out
