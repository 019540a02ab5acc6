"""Turns a StepPlan into tensors and one forward-metadata object, and runs the model: decode-only
steps through padded shapes (CUDA graphs on a GPU), other steps eagerly."""

from __future__ import annotations

import torch

from shard.engine.decode_graphs import DecodeGraphs
from shard.engine.forward_inputs import HOST, ForwardInputs
from shard.engine.kv_cache import KvCache
from shard.engine.step_plan import Step, StepPlan
from shard.model.forward_meta import ForwardMeta
from shard.model.layers.lora import LoraBatch, LoraGroup
from shard.model.llama import LlamaForCausalLM
from shard.model.lora_weights import AdapterWeights

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
        device: torch.device,
        decode_graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.kv_layers = kv.layers()
        self.device = device
        self.dtype = kv.k.dtype
        self.decode_graphs = decode_graphs
        self.builder = ForwardInputs(kv.page_size, model.query_group)

    def inputs(
        self, plan: StepPlan, weights: list[AdapterWeights | None]
    ) -> tuple[torch.Tensor, ForwardMeta]:
        """Token ids [T] and the forward metadata of a plan, uploaded to the device in one
        copy (on a CPU the host tensors are used as they are)."""
        fields = self.builder.fields(plan)
        lora = self.builder.lora(plan, weights, self.dtype)
        if self.device.type == HOST.type:
            dev = fields  # the forward runs where they are: nothing to copy
        else:
            dev = upload(fields | lora_fields(lora), self.device)
            lora = lora_on(lora, dev, self.device)
        return dev["input_ids"], self.builder.meta(dev, plan.prefills, lora)

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor:
        """float32 logits [B, vocab] for the rows in step.plan.logits_rows, LoRA segment i on
        step.weights[i] (on CUDA possibly a view of a graph's output: read it before the next
        forward)."""
        plan, weights = step.plan, list(step.weights)
        if self.decode_graphs is not None:
            key = self.decode_graphs.key(plan, weights)
            if key is not None:
                return self.decode_graphs.run(plan, weights, key)
        ids, meta = self.inputs(plan, weights)
        return self.model(ids, meta, self.kv_layers)
