"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5): RMSNorm, RoPE, GQA attention (with Qwen2's
q/k/v biases), SwiGLU MLP.

Module names follow Hugging Face so checkpoints and PEFT adapters map one to one. Layers take
their tensor-parallel slice from `TPGroup`; attention and LoRA run through `shard.ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shard.model.config import ModelConfig
from shard.model.forward_meta import ForwardMeta
from shard.model.fusion import elementwise
from shard.model.layers.attention import PagedAttention
from shard.model.layers.embedding import VocabParallel
from shard.model.layers.linear import MergedColumnLinear, RowLinear
from shard.model.layers.norm import RMSNorm
from shard.model.layers.placement import Placement
from shard.model.layers.rotary import RotaryEmbedding, rope_qkv
from shard.model.projections import GATE_UP, QKV
from shard.model.sharding import local_kv_heads
from shard.parallel.group import TPGroup

# What a layer leaves to be added to the residual stream by the next one's norm chain: nothing
# (before the first layer), or its MLP output [T, hidden] and that output's LoRA term (or None).
Pending = tuple[()] | tuple[torch.Tensor, torch.Tensor | None]


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        at: Placement,
    ) -> None:
        super().__init__()
        d = cfg.head_dim
        self.heads = at.group.split(cfg.num_heads, "num_attention_heads")
        self.kv_heads = local_kv_heads(cfg, at.group)
        widths = dict(zip(QKV, (self.heads * d, self.kv_heads * d, self.kv_heads * d), strict=True))
        self.qkv_proj = MergedColumnLinear(cfg.hidden_size, widths, layer_idx, at, cfg.qkv_bias)
        self.o_proj = RowLinear(self.heads * d, cfg.hidden_size, "o_proj", layer_idx, at)
        self.attn = PagedAttention(self.heads, self.kv_heads, d)
        self.head_dim = d

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: ForwardMeta,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(o_proj output, its LoRA term or None)."""
        qkv, lora = self.qkv_proj(x, meta.lora)
        q, k, v = rope_qkv(qkv, lora, *rope, self.heads, self.kv_heads)
        out = self.attn(q, k, v, kv[0], kv[1], meta)
        return self.o_proj(out.view(x.shape[0], self.heads * self.head_dim), meta.lora)


@elementwise
def silu_mul(gate_up: torch.Tensor, lora: torch.Tensor | None, inter: int) -> torch.Tensor:
    """SwiGLU: silu(gate) * up of the merged [T, 2 * inter] projection plus its LoRA term."""
    if lora is not None:
        gate_up = gate_up + lora
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, at: Placement) -> None:
        super().__init__()
        inter = at.group.split(cfg.intermediate_size, "intermediate_size")
        self.gate_up_proj = MergedColumnLinear(
            cfg.hidden_size, dict.fromkeys(GATE_UP, inter), layer_idx, at
        )
        self.down_proj = RowLinear(inter, cfg.hidden_size, "down_proj", layer_idx, at)
        self.inter = inter

    def forward(
        self, x: torch.Tensor, meta: ForwardMeta
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(down_proj output, its LoRA term or None)."""
        gate_up, lora = self.gate_up_proj(x, meta.lora)
        return self.down_proj(silu_mul(gate_up, lora, self.inter), meta.lora)


class LlamaDecoderLayer(nn.Module):
    """Takes the residual stream and the previous layer's MLP output (and its LoRA term) not yet
    added to it, so that each residual add runs in one chain with the norm after it."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, at: Placement) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, at)
        self.self_attn = LlamaAttention(cfg, layer_idx, at)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, at)
        self.mlp = LlamaMLP(cfg, layer_idx, at)

    def forward(
        self,
        x: torch.Tensor,
        delta: Pending,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: ForwardMeta,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, Pending]:
        """x [T, hidden] residual stream and what is still to be added to it -> (stream, MLP
        output and its LoRA term)."""
        h, x = self.input_layernorm(x, *delta)
        h, x = self.post_attention_layernorm(x, *self.self_attn(h, kv, meta, rope))
        return x, self.mlp(h, meta)


class LlamaForCausalLM(nn.Module):
    """Token ids + forward metadata + KV pages -> logits of the rows that are sampled."""

    def __init__(
        self, cfg: ModelConfig, group: TPGroup, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.config = cfg
        at = Placement(group, dtype, device)
        self.embed_tokens = VocabParallel(cfg.vocab_size, cfg.hidden_size, at)
        rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_context, cfg.rope_theta, cfg.rope_scaling, device
        )
        self.rotary = rotary
        layers = [LlamaDecoderLayer(cfg, i, at) for i in range(cfg.num_layers)]
        self.layers = nn.ModuleList(layers)
        # Query heads per KV head on this rank, the same in every layer.
        self.query_group = layers[0].self_attn.heads // layers[0].self_attn.kv_heads
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, at)
        self.lm_head = (
            self.embed_tokens
            if cfg.tie_word_embeddings
            else VocabParallel(cfg.vocab_size, cfg.hidden_size, at)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: ForwardMeta,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids [T] -> float32 logits [B, vocab] of the rows in meta.logits_rows."""
        x = self.embed_tokens.embed(input_ids)
        delta: Pending = ()
        rope = self.rotary.tables(meta.positions)
        for layer, layer_kv in zip(self.layers, kv, strict=True):
            x, delta = layer(x, delta, layer_kv, meta, rope)
        rows = meta.logits_rows
        h, _ = self.norm(x[rows], *(None if t is None else t[rows] for t in delta))
        return self.lm_head.logits(h)
