"""The tensors of a tree of dataclasses and dicts, by dotted path: read them all, or swap some in.
Decode graphs use it to move every per-step tensor of a batch's metadata into one staging
buffer."""

from __future__ import annotations

import dataclasses

import torch


def tensor_leaves(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a tree of dataclasses and dicts, by dotted path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for name, value in items:
        out.update(tensor_leaves(value, f"{prefix}.{name}" if prefix else str(name)))
    return out


def replace_leaves(obj: object, leaves: dict[str, torch.Tensor], prefix: str = "") -> object:
    """A copy of the tree with the tensors at `leaves`' paths swapped in."""
    if isinstance(obj, torch.Tensor):
        return leaves.get(prefix, obj)
    if dataclasses.is_dataclass(obj):
        changes = {
            f.name: replace_leaves(getattr(obj, f.name), leaves, _join(prefix, f.name))
            for f in dataclasses.fields(obj)
        }
        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    if isinstance(obj, dict):
        return {k: replace_leaves(v, leaves, _join(prefix, str(k))) for k, v in obj.items()}
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
