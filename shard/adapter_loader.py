"""Reads and validates a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`).

Validation fails closed: anything the engine cannot apply exactly is refused with a message that
names the problem, so the base model never answers in an adapter's place.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from shard.layers.lora import LORA_MODULES
from shard.model_config import ModelConfig
from shard.parallel import TPGroup
from shard.sharding import ROW_PARALLEL, input_cols, output_rows

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)


class AdapterErrorKind(enum.Enum):
    NOT_FOUND = "not_found"  # no such adapter under the root
    INVALID = "invalid"  # the request names the adapter wrongly (bad id)
    UNSUPPORTED = "unsupported"  # the adapter exists but cannot be served by this base model


class AdapterError(Exception):
    def __init__(self, kind: AdapterErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """One adapter's LoRA weights for this rank, stacked over layers."""

    adapter_id: str
    digest: str  # sha256 of adapter_model.safetensors
    rank: int
    scale: float
    a: dict[str, torch.Tensor]  # module -> [L, r, in_local]
    b: dict[str, torch.Tensor]  # module -> [L, r, out_local]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m for m in LORA_MODULES if m in self.a)


def resolve(root: Path, adapter_id: str) -> Path:
    """The adapter's folder under `root`; refuses ids that could escape it."""
    if not ADAPTER_ID.match(adapter_id) or adapter_id in (".", ".."):
        raise AdapterError(
            AdapterErrorKind.INVALID,
            f"adapter id {adapter_id!r} is not a valid name: use letters, digits, '.', '_', '-' "
            "(max 128 characters, no path separators)",
        )
    path = root / adapter_id
    real_root = root.resolve()
    if path.is_symlink() or real_root not in path.resolve().parents:
        raise AdapterError(
            AdapterErrorKind.INVALID, f"adapter {adapter_id!r} resolves outside the adapter root"
        )
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(
            AdapterErrorKind.NOT_FOUND,
            f"adapter {adapter_id!r} not found: no {adapter_id}/adapter_config.json under the "
            "adapter root",
        )
    return path


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unsupported(adapter_id: str, what: str) -> AdapterError:
    return AdapterError(AdapterErrorKind.UNSUPPORTED, f"adapter {adapter_id!r}: {what}")


def read_config(path: Path, adapter_id: str) -> dict:
    try:
        conf = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise _unsupported(adapter_id, f"adapter_config.json is not valid JSON ({e})") from e
    if conf.get("peft_type", "LORA") != "LORA":
        raise _unsupported(adapter_id, f"peft_type {conf.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "fan_in_fan_out"):
        if conf.get(key):
            raise _unsupported(adapter_id, f"{key}=true is not supported")
    if conf.get("bias", "none") != "none":
        raise _unsupported(adapter_id, f"bias={conf['bias']!r} is not supported (only 'none')")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise _unsupported(adapter_id, "per-module rank_pattern/alpha_pattern is not supported")
    return conf


def load_adapter(
    root: Path,
    adapter_id: str,
    cfg: ModelConfig,
    group: TPGroup,
    dtype: torch.dtype,
    max_rank: int,
) -> AdapterWeights:
    """Reads, validates and slices one adapter into host tensors of `dtype`."""
    path = resolve(root, adapter_id)
    conf = read_config(path, adapter_id)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        found = sorted(p.name for p in path.iterdir())
        raise _unsupported(
            adapter_id,
            f"adapter_model.safetensors is missing (found {found}); pickle weights are never "
            "loaded",
        )
    rank = int(conf.get("r", 0))
    if not 1 <= rank <= max_rank:
        raise _unsupported(adapter_id, f"rank r={rank} is outside the supported 1..{max_rank}")
    alpha = float(conf.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank

    raw: dict[tuple[int, str, str], torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            m = _KEY.match(key)
            if m is None:
                raise _unsupported(adapter_id, f"tensor {key!r} is not a supported LoRA weight")
            layer, module, which = int(m.group(1)), m.group(2), m.group(3)
            if module not in LORA_MODULES:
                raise _unsupported(
                    adapter_id, f"target module {module!r} is not supported ({LORA_MODULES})"
                )
            if layer >= cfg.num_layers:
                raise _unsupported(
                    adapter_id, f"{key}: layer {layer} but the base model has {cfg.num_layers}"
                )
            raw[(layer, module, which)] = f.get_tensor(key)
    if not raw:
        raise _unsupported(adapter_id, "adapter_model.safetensors holds no LoRA weights")

    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for module in sorted({k[1] for k in raw}, key=LORA_MODULES.index):
        a[module], b[module] = _stack(raw, module, rank, cfg, group, dtype, adapter_id)
    return AdapterWeights(adapter_id, file_digest(weights), rank, scale, a, b)


def _stack(
    raw: dict[tuple[int, str, str], torch.Tensor],
    module: str,
    rank: int,
    cfg: ModelConfig,
    group: TPGroup,
    dtype: torch.dtype,
    adapter_id: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks one module's per-layer A [r, in] and B [out, r] into this rank's slices
    A [L, r, in_local] and B^T [L, r, out_local]; layers the adapter skips stay zero."""
    inp, out = cfg.projection_shape(module)
    row_parallel = module in ROW_PARALLEL
    cols = input_cols(cfg, group, module) if row_parallel else slice(0, inp)
    rows = slice(0, out) if row_parallel else output_rows(cfg, group, module)
    a = torch.zeros(cfg.num_layers, rank, cols.stop - cols.start, dtype=dtype)
    b = torch.zeros(cfg.num_layers, rank, rows.stop - rows.start, dtype=dtype)
    for layer in range(cfg.num_layers):
        wa, wb = raw.get((layer, module, "A")), raw.get((layer, module, "B"))
        if wa is None and wb is None:
            continue
        if wa is None or wb is None:
            raise _unsupported(adapter_id, f"layer {layer} {module} has only one of lora_A/lora_B")
        if tuple(wa.shape) != (rank, inp) or tuple(wb.shape) != (out, rank):
            raise _unsupported(
                adapter_id,
                f"layer {layer} {module}: lora_A {tuple(wa.shape)} / lora_B {tuple(wb.shape)} "
                f"do not match the base model (expected lora_A ({rank}, {inp}), "
                f"lora_B ({out}, {rank}))",
            )
        a[layer] = wa[:, cols].to(dtype)
        b[layer] = wb[rows].t().to(dtype)
    return a, b
