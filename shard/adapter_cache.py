"""Adapters loaded on demand: disk -> host (loader thread) -> device (side stream), with a byte
budget on the device and LRU eviction of adapters that no running request uses."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from shard.adapter_loader import (
    AdapterError,
    AdapterErrorKind,
    AdapterWeights,
    load_adapter,
    resolve,
)
from shard.model_config import ModelConfig
from shard.parallel import TPGroup

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Resident:
    """An adapter in device memory (hot, mutable state)."""

    weights: AdapterWeights
    ready: torch.cuda.Event | None  # set when its host-to-device copy has finished
    refs: int = 0
    pinned: bool = False
    last_used: float = 0.0


@dataclass(frozen=True, slots=True)
class AdapterEntry:
    """What ListAdapters reports for one adapter."""

    adapter_id: str
    residency: str  # "gpu" (device, whatever the device is), "host" or "disk"
    rank: int
    size_bytes: int
    digest: str
    last_used: float
    targets: tuple[str, ...]


class AdapterCache:
    """Owned by the engine thread except `request`, which the server may call from any thread."""

    def __init__(
        self,
        root: Path,
        cfg: ModelConfig,
        group: TPGroup,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
        max_rank: int,
    ) -> None:
        self.root, self.cfg, self.group = root, cfg, group
        self.dtype, self.device = dtype, device
        self.budget_bytes = budget_bytes
        self.max_rank = max_rank
        self._lock = threading.RLock()  # engine thread vs. LoadAdapter/EvictAdapter RPCs
        self._pinned: set[str] = set()
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # LRU first
        self._host: dict[str, AdapterWeights] = {}
        self._loading: dict[str, Future[AdapterWeights]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def used_bytes(self) -> int:
        return sum(r.weights.nbytes for r in self._resident.values())

    def check(self, adapter_id: str) -> None:
        """Raises AdapterError at once for ids that are invalid or absent."""
        resolve(self.root, adapter_id)

    def request(self, adapter_id: str) -> None:
        """Starts loading `adapter_id` from disk unless it is loaded or on its way."""
        with self._lock:
            if adapter_id in self._resident or adapter_id in self._host:
                return
            if adapter_id not in self._loading:
                self._loading[adapter_id] = self._pool.submit(self._read, adapter_id)

    def _read(self, adapter_id: str) -> AdapterWeights:
        start = time.perf_counter()
        w = load_adapter(self.root, adapter_id, self.cfg, self.group, self.dtype, self.max_rank)
        if self.device.type == "cuda":
            w = _map(w, lambda t: t.pin_memory())
        log.info(
            "adapter read",
            adapter_id=adapter_id,
            rank=w.rank,
            bytes=w.nbytes,
            seconds=round(time.perf_counter() - start, 4),
        )
        return w

    def poll(self, adapter_id: str) -> Resident | AdapterError | None:
        """The resident adapter, the error that stopped its load, or None while it is on its way
        (a load is started if needed)."""
        with self._lock:
            return self._poll(adapter_id)

    def _poll(self, adapter_id: str) -> Resident | AdapterError | None:
        res = self._resident.get(adapter_id)
        if res is not None:
            if res.ready is not None and not res.ready.query():
                return None
            self._resident.move_to_end(adapter_id)
            return res
        self.request(adapter_id)
        with self._lock:
            fut = self._loading.get(adapter_id)
            if fut is not None and fut.done():
                del self._loading[adapter_id]
                if fut.exception() is not None:
                    err = fut.exception()
                    if isinstance(err, AdapterError):
                        return err
                    return AdapterError(
                        AdapterErrorKind.UNSUPPORTED,
                        f"adapter {adapter_id!r} failed to load: {err}",
                    )
                self._host[adapter_id] = fut.result()
        host = self._host.get(adapter_id)
        if host is None or not self._make_room(host.nbytes):
            return None
        res = self._to_device(host)
        res.pinned = adapter_id in self._pinned
        self._resident[adapter_id] = res
        return self._poll(adapter_id)

    def preload(self, adapter_id: str, pin: bool) -> AdapterError | None:
        """Loads an adapter into device memory now (blocking; not on the engine thread)."""
        with self._lock:
            if pin:
                self._pinned.add(adapter_id)
                if adapter_id in self._resident:
                    self._resident[adapter_id].pinned = True
        while True:
            state = self.poll(adapter_id)
            if state is not None and not isinstance(state, AdapterError):
                return None
            if isinstance(state, AdapterError):
                return state
            time.sleep(0.005)

    def evict(self, adapter_id: str) -> bool:
        """Drops an adapter from device and host memory unless a running request uses it."""
        with self._lock:
            self._pinned.discard(adapter_id)
            res = self._resident.get(adapter_id)
            if res is not None and res.refs > 0:
                res.pinned = False
                return False
            found = self._resident.pop(adapter_id, None) or self._host.pop(adapter_id, None)
            return found is not None

    def _make_room(self, nbytes: int) -> bool:
        """Evicts least recently used idle adapters until `nbytes` fit in the budget."""
        if nbytes > self.budget_bytes:
            return False
        for adapter_id in list(self._resident):
            if self.used_bytes + nbytes <= self.budget_bytes:
                break
            res = self._resident[adapter_id]
            if res.refs == 0 and not res.pinned:
                del self._resident[adapter_id]
                log.info("adapter evicted", adapter_id=adapter_id, bytes=res.weights.nbytes)
        return self.used_bytes + nbytes <= self.budget_bytes

    def _to_device(self, host: AdapterWeights) -> Resident:
        if self._stream is None:
            return Resident(host, ready=None)
        with torch.cuda.stream(self._stream):
            dev = _map(host, lambda t: t.to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self._stream)
        return Resident(dev, ready=event)

    def acquire(self, adapter_id: str) -> Resident:
        """Marks a resident adapter as used by one more running request."""
        res = self._resident[adapter_id]
        res.refs += 1
        res.last_used = time.time()
        return res

    def release(self, adapter_id: str) -> None:
        res = self._resident.get(adapter_id)
        if res is not None:
            res.refs -= 1

    def resident_ids(self) -> list[str]:
        return list(self._resident)

    def weights(self, adapter_id: str) -> AdapterWeights:
        """The device weights of a resident adapter."""
        return self._resident[adapter_id].weights

    def entries(self) -> list[AdapterEntry]:
        """Every adapter folder under the root with its residency."""
        out = []
        resident = dict(self._resident)
        for path in sorted(p for p in self.root.iterdir() if (p / "adapter_config.json").is_file()):
            aid = path.name
            res = resident.get(aid)
            w = res.weights if res else self._host.get(aid)
            residency = "gpu" if res else ("host" if w else "disk")
            out.append(
                AdapterEntry(
                    aid,
                    residency,
                    w.rank if w else 0,
                    w.nbytes if w else 0,
                    w.digest if w else "",
                    res.last_used if res else 0.0,
                    w.targets if w else (),
                )
            )
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _map(w: AdapterWeights, fn: Callable[[torch.Tensor], torch.Tensor]) -> AdapterWeights:
    return AdapterWeights(
        w.adapter_id,
        w.digest,
        w.rank,
        w.scale,
        {k: fn(t) for k, t in w.a.items()},
        {k: fn(t) for k, t in w.b.items()},
    )
