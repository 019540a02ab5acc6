"""Reads and validates a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`).

Validation fails closed: anything the engine cannot apply exactly is refused with a message that
names the problem, so the base model never answers in an adapter's place.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from safetensors.torch import load as load_safetensors

from shard.engine.faults import quote
from shard.model.config import ModelConfig
from shard.model.lora_weights import AdapterWeights
from shard.model.projections import LORA_MODULES, ROW_PARALLEL
from shard.model.sharding import input_cols, output_rows
from shard.parallel.group import TPGroup

log = structlog.get_logger(__name__)

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# One thread hashes adapter files beside their parsing (see load_adapter); it starts on first use.
_HASHER = ThreadPoolExecutor(1, thread_name_prefix="adapter-digest")
_ALIGN = 256  # bytes; every tensor of a packed adapter starts on this boundary (kernel loads)
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)


class AdapterErrorKind(enum.Enum):
    NOT_FOUND = "not_found"  # no such adapter under the root
    INVALID = "invalid"  # the request names the adapter wrongly (bad id, escapes the root)
    UNSUPPORTED = "unsupported"  # the adapter exists but cannot be served by this base model
    EXHAUSTED = "exhausted"  # serving it would break a memory rule (e.g. too much pinned)
    # Its files were replaced while the ranks of a tensor-parallel shard read them: a retry
    # reads the new version everywhere.
    CHANGED = "changed"


class AdapterError(Exception):
    def __init__(self, kind: AdapterErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[type[AdapterError], tuple[AdapterErrorKind, str]]:
        # Followers send their errors to rank 0 pickled; the default would drop `kind`.
        return AdapterError, (self.kind, str(self))


@dataclass(frozen=True, slots=True)
class FileSig:
    """What identifies the files on disk cheaply (one stat each), to notice a replacement."""

    config: tuple[int, int, int]  # (inode, size, mtime_ns) of adapter_config.json
    weights: tuple[int, int, int]  # the same for adapter_model.safetensors


def split_key(name: str) -> tuple[str, str | None]:
    """(adapter id, version or None) of an `id` or an `id@version`."""
    adapter_id, _, version = name.partition("@")
    return adapter_id, version or None


def as_adapter_error(adapter_id: str, err: BaseException) -> AdapterError:
    """`err` as an AdapterError (an unexpected failure counts as an unusable adapter)."""
    if isinstance(err, AdapterError):
        return err
    return AdapterError(
        AdapterErrorKind.UNSUPPORTED, f"adapter {adapter_id!r} failed to load: {err}"
    )


def resolve(root: Path, adapter_id: str) -> Path:
    """The adapter's folder under `root`; refuses ids and links that could escape it."""
    if not ADAPTER_ID.match(adapter_id) or adapter_id in (".", ".."):
        raise AdapterError(
            AdapterErrorKind.INVALID,
            f"adapter id {quote(adapter_id)} is not a valid name: use letters, digits, '.', '_', "
            "'-' (max 128 characters, no path separators)",
        )
    path = root / adapter_id
    real_root = root.resolve()
    if path.is_symlink() or real_root not in path.resolve().parents:
        raise AdapterError(
            AdapterErrorKind.INVALID, f"adapter {adapter_id!r} resolves outside the adapter root"
        )
    config = path / CONFIG_FILE
    if not config.is_file():
        raise AdapterError(
            AdapterErrorKind.NOT_FOUND,
            f"adapter {adapter_id!r} not found: no {adapter_id}/{CONFIG_FILE} under the "
            "adapter root",
        )
    for file in (config, path / WEIGHTS_FILE):
        if file.is_symlink() and real_root not in file.resolve().parents:
            raise AdapterError(
                AdapterErrorKind.INVALID,
                f"adapter {adapter_id!r}: {file.name} links outside the adapter root",
            )
    return path


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def file_sig(path: Path) -> FileSig:
    """The signature of an adapter folder's two files (zeros for a missing file)."""
    return FileSig(_stat(path / CONFIG_FILE), _stat(path / WEIGHTS_FILE))


def _unsupported(adapter_id: str, what: str) -> AdapterError:
    return AdapterError(AdapterErrorKind.UNSUPPORTED, f"adapter {adapter_id!r}: {what}")


def _read_bytes(path: Path) -> tuple[bytes, tuple[int, int, int]]:
    """The file's bytes and the signature of exactly the file read (it may be replaced later)."""
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        return f.read(), (st.st_ino, st.st_size, st.st_mtime_ns)


def declared(path: Path) -> tuple[int, tuple[str, ...]]:
    """Rank `r` and target modules that an adapter folder's adapter_config.json declares, read
    without loading the weights; (0, ()) when the file cannot be read."""
    try:
        conf = json.loads((path / CONFIG_FILE).read_bytes())
        rank = int(conf.get("r", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0, ()
    targets = conf.get("target_modules") or ()
    if isinstance(targets, str):  # a regex or "all-linear"
        targets = (targets,)
    return max(rank, 0), tuple(sorted({str(t).rsplit(".", 1)[-1] for t in targets}))


def check_config(conf: dict, adapter_id: str, cfg: ModelConfig, base_mismatch: str) -> None:
    """Refuses adapter_config.json settings the engine cannot apply exactly."""
    if conf.get("peft_type", "LORA") != "LORA":
        raise _unsupported(adapter_id, f"peft_type {conf.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "fan_in_fan_out"):
        if conf.get(key):
            raise _unsupported(adapter_id, f"{key}=true is not supported")
    if conf.get("bias", "none") != "none":
        raise _unsupported(adapter_id, f"bias={conf['bias']!r} is not supported (only 'none')")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise _unsupported(adapter_id, "per-module rank_pattern/alpha_pattern is not supported")
    if conf.get("modules_to_save"):
        raise _unsupported(
            adapter_id, f"modules_to_save={conf['modules_to_save']} is not supported"
        )
    targets = conf.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in LORA_MODULES]
        if unknown:
            raise _unsupported(
                adapter_id,
                f"target module {unknown[0]!r} is not supported (supported: "
                f"{', '.join(LORA_MODULES)})",
            )
    base = conf.get("base_model_name_or_path")
    if base and Path(str(base).rstrip("/")).name.lower() != cfg.name.lower():
        what = (
            f"trained on base model {base!r}, but this shard serves {cfg.name!r} "
            "(--adapter-base-mismatch=warn serves it anyway)"
        )
        if base_mismatch == "error":
            raise _unsupported(adapter_id, what)
        log.warning("adapter base model differs", adapter_id=adapter_id, base_model=base)


def load_adapter(
    root: Path,
    adapter_id: str,
    cfg: ModelConfig,
    group: TPGroup,
    dtype: torch.dtype,
    max_rank: int,
    base_mismatch: str = "warn",
) -> tuple[AdapterWeights, FileSig]:
    """Reads, validates and slices one adapter into host tensors of `dtype`, and the signature
    of the files it read. Each file is read once, so the digest is of the bytes parsed."""
    path = resolve(root, adapter_id)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        found = sorted(p.name for p in path.iterdir())
        raise _unsupported(
            adapter_id,
            f"{WEIGHTS_FILE} is missing (found {found}); pickle weights (.bin, .pt) are never "
            "loaded: convert them to safetensors",
        )
    config_bytes, config_stat = _read_bytes(path / CONFIG_FILE)
    try:
        conf = json.loads(config_bytes)
    except json.JSONDecodeError as e:
        raise _unsupported(adapter_id, f"{CONFIG_FILE} is not valid JSON ({e})") from e
    check_config(conf, adapter_id, cfg, base_mismatch)
    rank = int(conf.get("r", 0))
    if not 1 <= rank <= max_rank:
        raise _unsupported(adapter_id, f"rank r={rank} is outside the supported 1..{max_rank}")
    alpha = float(conf.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank

    data, weights_stat = _read_bytes(weights)
    # hashlib drops the GIL over large buffers: the digest (a quarter of a 7B adapter's read
    # time) is computed while the tensors are parsed and stacked.
    digest_of = _HASHER.submit(lambda: hashlib.sha256(data).hexdigest())
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise _unsupported(adapter_id, f"{WEIGHTS_FILE} cannot be read ({e})") from e
    raw: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise _unsupported(adapter_id, f"tensor {key!r} is not a supported LoRA weight")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in LORA_MODULES:
            raise _unsupported(
                adapter_id,
                f"target module {module!r} is not supported (supported: {', '.join(LORA_MODULES)})",
            )
        if layer >= cfg.num_layers:
            raise _unsupported(
                adapter_id, f"{key}: layer {layer} but the base model has {cfg.num_layers}"
            )
        raw[(layer, module, which)] = tensor
    if not raw:
        raise _unsupported(adapter_id, f"{WEIGHTS_FILE} holds no LoRA weights")

    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for module in sorted({k[1] for k in raw}, key=LORA_MODULES.index):
        a[module], b[module] = _stack(raw, module, rank, cfg, group, dtype, adapter_id)
    digest = digest_of.result()
    version = hashlib.sha256(config_bytes + digest.encode()).hexdigest()[:16]
    w = AdapterWeights(adapter_id, digest, version, rank, scale, a, b)
    return w, FileSig(config_stat, weights_stat)


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
    a = torch.empty(cfg.num_layers, rank, cols.stop - cols.start, dtype=dtype)
    b = torch.empty(cfg.num_layers, rank, rows.stop - rows.start, dtype=dtype)
    for layer in range(cfg.num_layers):
        wa, wb = raw.get((layer, module, "A")), raw.get((layer, module, "B"))
        if wa is None and wb is None:
            a[layer], b[layer] = 0, 0
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


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _tensors(w: AdapterWeights) -> list[torch.Tensor]:
    return [*w.a.values(), *w.b.values()]


def packed_size(w: AdapterWeights) -> int:
    return sum(_aligned(t.numel() * t.element_size()) for t in _tensors(w))


def carve(flat: torch.Tensor, w: AdapterWeights) -> AdapterWeights:
    """`w` with every tensor replaced by a view of `flat` [bytes] laid out by `packed_size`."""
    views: list[torch.Tensor] = []
    offset = 0
    for t in _tensors(w):
        n = t.numel() * t.element_size()
        views.append(flat[offset : offset + n].view(t.dtype).view(t.shape))
        offset += _aligned(n)
    it = iter(views)
    return dataclasses.replace(w, a={k: next(it) for k in w.a}, b={k: next(it) for k in w.b})


def pack(w: AdapterWeights, pin: bool) -> tuple[torch.Tensor, AdapterWeights]:
    """One host buffer [bytes] (pinned if `pin`) holding all of `w`, and `w` as views of it: a
    single copy moves the whole adapter to the device."""
    flat = torch.empty(packed_size(w), dtype=torch.uint8, pin_memory=pin)
    packed = carve(flat, w)
    for dst, src in zip(_tensors(packed), _tensors(w), strict=True):
        dst.copy_(src)
    return flat, packed
