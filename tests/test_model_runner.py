"""The one-copy upload of a step's metadata (the CUDA path) run on CPU tensors: every field and
every LoRA table comes back equal, in one buffer, aligned for its dtype."""

from __future__ import annotations

import torch

from shard.engine.model_runner import lora_fields, lora_on, upload
from shard.model.layers.lora import build_lora_batch
from shard.model.lora_weights import AdapterWeights
from shard.model.projections import LORA_MODULES


def adapter(name: str, rank: int) -> AdapterWeights:
    a = {m: torch.zeros(2, rank, 8) for m in LORA_MODULES}
    b = {m: torch.zeros(2, rank, 8) for m in LORA_MODULES}
    return AdapterWeights(name, "digest", "v1", rank, 2.0, a, b)


def test_upload_packs_every_field_into_one_buffer_and_the_lora_tables_come_back() -> None:
    host = build_lora_batch(
        [0, 3, 5], [adapter("x", 8), None, adapter("y", 16)], 7, torch.float32, torch.device("cpu")
    )
    fields = {
        "ids": torch.arange(7, dtype=torch.int64),
        "tables": torch.arange(6, dtype=torch.int32).view(2, 3),
        "empty": torch.empty(0, 5, dtype=torch.int32),
        "flag": torch.tensor([True, False, True]),
    } | lora_fields(host)
    dev = upload(fields, torch.device("cpu"))
    base = dev["ids"].untyped_storage().data_ptr()
    for name, t in fields.items():
        assert torch.equal(dev[name], t) and dev[name].dtype == t.dtype, name
        if t.numel():
            assert dev[name].untyped_storage().data_ptr() == base, name  # one buffer
            assert dev[name].data_ptr() % t.element_size() == 0, name
    lora = lora_on(host, dev, torch.device("cpu"))
    assert lora is not None and set(lora.groups) == set(host.groups)
    assert torch.equal(lora.seg_starts, host.seg_starts)
    for key, group in host.groups.items():
        for name in ("a_ptrs", "b_ptrs", "ranks", "scales"):
            assert torch.equal(getattr(lora.groups[key], name), getattr(group, name)), (key, name)
    assert lora.buffer.shape == host.buffer.shape and lora.buffer is not host.buffer
    assert lora_fields(None) == {} and lora_on(None, dev, torch.device("cpu")) is None
