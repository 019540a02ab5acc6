"""Turns a StepPlan into tensors and one forward-metadata object, and runs the model: decode-only
steps through padded shapes (CUDA graphs on a GPU), other steps eagerly."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shard.adapters.loader import AdapterWeights
from shard.engine.decode_graphs import DecodeGraphs
from shard.engine.kv_cache import KvCache
from shard.engine.step_plan import StepPlan
from shard.model.forward_meta import ForwardMeta
from shard.model.layers.lora import LoraBatch, LoraGroup, build_lora_batch
from shard.model.llama import LlamaForCausalLM

HOST = torch.device("cpu")
ALIGN = 16  # bytes: every packed field starts aligned for any dtype's view


def upload(fields: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors -> views of one device buffer, filled by a single host-to-device copy
    (from pinned memory on CUDA, so it does not block the host)."""
    offsets, total = {}, 0
    for name, t in fields.items():
        offsets[name] = total
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    buf = torch.empty(max(total, ALIGN), dtype=torch.uint8, pin_memory=device.type == "cuda")
    views = {}
    for name, t in fields.items():
        nbytes = t.numel() * t.element_size()
        views[name] = buf[offsets[name] : offsets[name] + nbytes].view(t.dtype).view(t.shape)
        views[name].copy_(t)
    if device.type == HOST.type:
        return views
    dev = buf.to(device, non_blocking=True)
    return {
        name: dev[offsets[name] : offsets[name] + v.numel() * v.element_size()]
        .view(v.dtype)
        .view(v.shape)
        for name, v in views.items()
    }


LORA_TABLES = ("a_ptrs", "b_ptrs", "ranks", "scales")


def lora_fields(lora: LoraBatch | None) -> dict[str, torch.Tensor]:
    """A host LoraBatch's per-step tables, named for `upload` (its scratch buffer left out)."""
    if lora is None:
        return {}
    out = {"lora.seg_starts": lora.seg_starts}
    for key, group in lora.groups.items():
        out |= {f"lora.{key}.{name}": getattr(group, name) for name in LORA_TABLES}
    return out


def lora_on(
    lora: LoraBatch | None, uploaded: dict[str, torch.Tensor], device: torch.device
) -> LoraBatch | None:
    """The LoraBatch over the uploaded copies of `lora_fields(lora)`, with a scratch buffer of
    the same shape on `device`."""
    if lora is None:
        return None
    groups = {
        key: LoraGroup(*(uploaded[f"lora.{key}.{name}"] for name in LORA_TABLES))
        for key in lora.groups
    }
    scratch = torch.empty(lora.buffer.shape, dtype=lora.buffer.dtype, device=device)
    return LoraBatch(uploaded["lora.seg_starts"], groups, scratch)


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
        attn = model.layers[0].self_attn.attn
        self.query_group = attn.num_heads // attn.num_kv_heads

    def inputs(
        self, plan: StepPlan, weights: list[AdapterWeights | None]
    ) -> tuple[torch.Tensor, ForwardMeta]:
        """Token ids [T] and the forward metadata of a plan, uploaded to the device in one
        copy (on a CPU the host tensors are used as they are)."""
        nd = len(plan.decode_pages)
        width = max((len(p) for p in plan.decode_pages), default=1)
        tables = [t for p in plan.decode_pages for t in (*p, *([0] * (width - len(p))))]
        fields = {
            "input_ids": torch.tensor(plan.input_ids, dtype=torch.int64),
            "positions": torch.tensor(plan.positions, dtype=torch.int64),
            "decode_slots": torch.tensor(plan.slots, dtype=torch.int64),
            "block_tables": torch.tensor(tables, dtype=torch.int32).view(nd, width),
            "context_lens": torch.tensor(plan.decode_context, dtype=torch.int32),
            "logits_rows": torch.tensor(plan.logits_rows, dtype=torch.int64),
        }
        if plan.prefills:
            # Each prefill row's first key slot in the gathered pages of all chunks: the slots
            # of its own chunk's pages start there, and its position is its last visible slot.
            page_size = self.kv.page_size
            first, pages = [], []
            for p in plan.prefills:
                first += [len(pages) * page_size] * (p.end - p.start)
                pages += p.pages
            fields["prefill_first"] = torch.tensor(first, dtype=torch.int64)
            fields["prefill_pages"] = torch.tensor(pages, dtype=torch.int64)
        lora = self.lora_batch(plan, weights, HOST)
        if self.device.type == HOST.type:
            dev = fields  # the forward runs where they are: nothing to copy
        else:
            dev = upload(fields | lora_fields(lora), self.device)
            lora = lora_on(lora, dev, self.device)
        pages, mask, slots = None, None, dev["decode_slots"]
        only = plan.prefills[0] if len(plan.prefills) == 1 else None
        causal = only is not None and only.end - only.start == only.context_len
        if plan.prefills:
            pages, first, positions = dev["prefill_pages"], dev["prefill_first"], dev["positions"]
            slots = torch.cat((slots, self._prefill_slots(pages, first, positions[nd:])))
            if not causal:
                mask = self._prefill_mask(first, positions[nd:], pages.numel())
        meta = ForwardMeta(
            positions=dev["positions"],
            slot_mapping=slots,
            num_decode=nd,
            block_tables=dev["block_tables"],
            context_lens=dev["context_lens"],
            prefill_pages=pages,
            prefill_mask=mask,
            prefill_causal=causal,
            logits_rows=dev["logits_rows"],
            lora=lora,
        )
        return dev["input_ids"], meta

    def _prefill_mask(
        self, first: torch.Tensor, positions: torch.Tensor, num_pages: int
    ) -> torch.Tensor:
        """[group * N_p, P * page_size] bool (ForwardMeta.prefill_mask): row i sees the slots
        first[i] .. first[i] + positions[i] of the gathered pages, its request's tokens up to
        its own position, built on the device from the two [N_p] vectors."""
        slots = torch.arange(num_pages * self.kv.page_size, device=first.device)
        mask = (slots >= first[:, None]) & (slots <= (first + positions)[:, None])
        return mask.repeat(self.query_group, 1)

    def _prefill_slots(
        self, pages: torch.Tensor, first: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """[N_p] the KV slot of each prefill row: page positions // page_size of its chunk's
        pages (which start at page first // page_size of the gathered ones), offset
        positions % page_size."""
        size = self.kv.page_size
        return pages[first // size + positions // size] * size + positions % size

    def lora_batch(
        self, plan: StepPlan, weights: list[AdapterWeights | None], device: torch.device
    ) -> LoraBatch | None:
        """Segments and per-projection weight pointers; None when no row uses an adapter."""
        if all(w is None for w in weights):
            return None
        starts = [row for row, _ in plan.segments]
        return build_lora_batch(starts, weights, plan.num_rows, self.dtype, device)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """float32 logits [B, vocab] for the rows in plan.logits_rows (on CUDA possibly a view
        of a graph's output: read it before the next forward)."""
        weights = [self.adapter_weights(a) if a else None for _, a in plan.segments]
        if self.decode_graphs is not None:
            key = self.decode_graphs.key(plan, weights)
            if key is not None:
                return self.decode_graphs.run(plan, weights, key)
        ids, meta = self.inputs(plan, weights)
        return self.model(ids, meta, self.kv_layers)
