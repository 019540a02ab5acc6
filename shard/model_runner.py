"""Turns a StepPlan into tensors and one forward-metadata object, and runs the model: decode-only
steps through padded shapes (CUDA graphs on a GPU), other steps eagerly."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shard.adapter_loader import AdapterWeights
from shard.decode_graphs import DecodeGraphs
from shard.forward_meta import ForwardMeta, PrefillSpan
from shard.kv_cache import KvCache
from shard.layers.lora import LoraBatch, build_lora_batch
from shard.llama import LlamaForCausalLM
from shard.step_plan import StepPlan


class ModelRunner:
    """Owns the model and the KV cache of one rank."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv: KvCache,
        adapter_weights: Callable[[str], AdapterWeights],
        device: torch.device,
        decode_graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.kv_layers = kv.layers()
        self.adapter_weights = adapter_weights
        self.device = device
        self.dtype = kv.k.dtype
        self.decode_graphs = decode_graphs

    def _tensor(self, values: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def meta(self, plan: StepPlan, weights: list[AdapterWeights | None]) -> ForwardMeta:
        nd = len(plan.decode_pages)
        width = max((len(p) for p in plan.decode_pages), default=1)
        tables = [list(p) + [0] * (width - len(p)) for p in plan.decode_pages]
        return ForwardMeta(
            positions=self._tensor(plan.positions, torch.int64),
            slot_mapping=self._tensor(plan.slots, torch.int64),
            num_decode=nd,
            block_tables=self._tensor(tables, torch.int32).view(nd, width),
            context_lens=self._tensor(plan.decode_context, torch.int32),
            prefills=tuple(
                PrefillSpan(p.start, p.end, p.context_len, self._tensor(p.pages, torch.int64))
                for p in plan.prefills
            ),
            logits_rows=self._tensor(plan.logits_rows, torch.int64),
            lora=self.lora_batch(plan, weights),
        )

    def lora_batch(self, plan: StepPlan, weights: list[AdapterWeights | None]) -> LoraBatch | None:
        """Segments and per-projection weight pointers; None when no row uses an adapter."""
        if all(w is None for w in weights):
            return None
        starts = [row for row, _ in plan.segments]
        return build_lora_batch(starts, weights, plan.num_rows, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """float32 logits [B, vocab] for the rows in plan.logits_rows (on CUDA possibly a view
        of a graph's output: read it before the next forward)."""
        weights = [self.adapter_weights(a) if a else None for _, a in plan.segments]
        if self.decode_graphs is not None:
            key = self.decode_graphs.key(plan, weights)
            if key is not None:
                return self.decode_graphs.run(plan, weights, key)
        ids = self._tensor(plan.input_ids, torch.int64)
        return self.model(ids, self.meta(plan, weights), self.kv_layers)
