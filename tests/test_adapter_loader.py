"""Adapter reading: layers an adapter leaves out are zero in the stacked weights, whatever the
fresh buffers held."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from shard.adapters.loader import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from shard.model.config import load_model_config
from shard.parallel.group import SINGLE


def test_layers_an_adapter_skips_are_zero(tiny, tmp_path, monkeypatch) -> None:
    src = tiny.adapters_dir / "r8-all"
    root = tmp_path / "adapters"
    (root / "first-layer").mkdir(parents=True)
    shutil.copy(src / CONFIG_FILE, root / "first-layer" / CONFIG_FILE)
    tensors = load_file(src / WEIGHTS_FILE)
    kept = {k: v for k, v in tensors.items() if ".layers.0." in k}
    assert kept and len(kept) < len(tensors)
    save_file(kept, root / "first-layer" / WEIGHTS_FILE)
    cfg = load_model_config(tiny.model_dir)
    whole, _ = load_adapter(tiny.adapters_dir, "r8-all", cfg, SINGLE, torch.float32, 128)

    empty = torch.empty
    # Fresh buffers full of NaN: a layer left unwritten shows.
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    part, _ = load_adapter(root, "first-layer", cfg, SINGLE, torch.float32, 128)
    assert set(part.a) == set(whole.a)
    for module in part.a:
        for got, full in ((part.a[module], whole.a[module]), (part.b[module], whole.b[module])):
            assert torch.equal(got[0], full[0])
            assert not got[1:].any()
