"""Adapters on demand in three tiers: disk -> host memory (loader thread, LRU byte budget) ->
device (one copy on a side stream while the batch runs, LRU byte budget over adapters that no
running request uses).

Every version of an adapter (its id + the content of its files) is an entry of its own, named
`id@version`: a reload makes a new entry, requests already running keep the one they started on,
and the old one leaves memory when its last request ends.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import structlog
import torch

from shard.adapters.device import copy_done, order_after_copy
from shard.adapters.loader import (
    CONFIG_FILE,
    AdapterError,
    AdapterErrorKind,
    as_adapter_error,
    declared,
    file_sig,
    load_adapter,
    resolve,
    split_key,
)
from shard.adapters.replicas import Replicas, Replicate
from shard.adapters.residency import Residency
from shard.adapters.tiers import AdapterEntry, Resident, entry_of
from shard.adapters.versions import Versions
from shard.metrics import ShardMetrics
from shard.model.config import ModelConfig
from shard.model.lora_weights import AdapterWeights
from shard.parallel.group import TPGroup

log = structlog.get_logger(__name__)

TIERS = ("gpu", "host", "disk")  # where a request's adapter is looked for, in this order


class AdapterCache:
    """Shared by the engine thread (`claim`, `release`, `want`, `weights`), the server
    (`lookup`, `preload`, `evict`, `entries`) and its loader thread; one lock guards the maps."""

    def __init__(
        self,
        root: Path,
        cfg: ModelConfig,
        group: TPGroup,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
        max_rank: int,
        *,
        host_budget_bytes: int | None = None,
        base_mismatch: str = "warn",
        metrics: ShardMetrics | None = None,
        replicate: Replicate | None = None,
        on_retired: Callable[[str], None] | None = None,
    ) -> None:
        """`replicate`: rank 0 of a tensor-parallel group asks its followers to hold a version
        through it; a version is claimed (enters step plans) only once every follower holds
        exactly that version (see `shard.adapters.replicas`). `on_retired(id@version)` is
        called whenever a version stops being the one new requests get (its files changed, or
        the adapter was evicted), from the thread that replaced or evicted it, under the cache's
        lock: it must be quick and thread-safe (the prefix cache's index)."""
        self.root, self.cfg, self.group = root, cfg, group
        self.dtype, self.device = dtype, device
        self.max_rank = max_rank
        self.base_mismatch = base_mismatch  # "warn" or "error"
        self.metrics = metrics
        self._lock = threading.RLock()
        self.versions = Versions(on_retired)
        host_budget = host_budget_bytes or 4 * budget_bytes
        self.residency = Residency(
            self.versions, self._lock, device, budget_bytes, host_budget, metrics
        )
        # The two tiers, public so that budgets can be read and (in tests) changed in place.
        self.host_tier = self.residency.host_tier
        self._host = self.host_tier.copies  # LRU first
        self.device_tier = self.residency.device_tier
        self._resident = self.device_tier.resident  # LRU first
        self._to_device = self.device_tier.copy_in  # a seam: tests and benchmarks slow copies down
        self._loading: dict[str, Future[str]] = {}  # id -> its read from disk
        # Why polls found no resident adapter: "reading" (from disk), "no_room" (the device
        # budget is full of adapters in use), "copying" (to the device, for a strict poll).
        self.waits: Counter[str] = Counter()
        self._replicas = Replicas(replicate) if replicate is not None else None
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")

    def is_current(self, key: str) -> bool:
        """Whether version `key` (`id@version`) is the one new requests of its id get."""
        with self._lock:
            return self.versions.is_current(key)

    # -- server side ----------------------------------------------------------------------------
    def lookup(self, adapter_id: str) -> None:
        """Once per request: validates the id, notices replaced files (a new version), counts the
        tier the adapter is found in and starts its read from disk if needed."""
        sig = file_sig(resolve(self.root, adapter_id))
        with self._lock:
            if self.versions.stale(adapter_id, sig):
                log.info("adapter files changed: loading a new version", adapter_id=adapter_id)
                self._forget(adapter_id)
            key = self.versions.get(adapter_id)
            tier = "gpu" if key in self._resident else "host" if key in self._host else "disk"
            if tier == "disk":
                self._start_load(adapter_id)
            if self.metrics is not None:
                for t in TIERS[: TIERS.index(tier) + 1]:
                    self.metrics.adapter_lookups.labels(t, "hit" if t == tier else "miss").inc()

    def preload(self, adapter_id: str, pin: bool, timeout_s: float) -> AdapterError | None:
        """Reads the adapter's files again (a changed content becomes the new version) and waits
        until that version is in device memory. Blocking: not for the engine thread. Raises
        TimeoutError when device memory stays full of adapters in use for `timeout_s`."""
        with self._lock:
            if pin:
                self.residency.pinned.add(adapter_id)
            self.residency.preloading[adapter_id] += 1
            fut = self._start_load(adapter_id, force=True)
        deadline = time.monotonic() + timeout_s
        try:
            try:
                fut.result(timeout_s)
            except TimeoutError:
                raise
            except Exception as e:  # the load's own error, as every waiting request sees it
                state: Resident | AdapterError | None = as_adapter_error(adapter_id, e)
            else:
                state = self.wait_resident(adapter_id, deadline)
                if state is None and not self._closed:
                    raise TimeoutError(
                        f"adapter {adapter_id!r} is read but device memory stayed full of "
                        f"adapters in use for {timeout_s:.0f} s (--adapter-memory-mb)"
                    )
            if isinstance(state, Resident) and self._replicas is not None:
                state = self._replicate(state.key) or state
            if isinstance(state, AdapterError):
                self.residency.pinned.discard(adapter_id)
                return state
            return self._check_pin_share(adapter_id) if pin else None
        finally:
            with self._lock:
                self.residency.preloading -= Counter([adapter_id])

    def _check_pin_share(self, adapter_id: str) -> AdapterError | None:
        with self._lock:
            return self.residency.pin_share_error(adapter_id)

    def evict(self, adapter_id: str) -> bool:
        """Unpins and drops every version of an adapter from device and host memory; versions in
        use leave when their last request ends. False when nothing was loaded."""
        with self._lock:
            self.residency.pinned.discard(adapter_id)
            found = self.versions.get(adapter_id) is not None
            for key in [k for k in (*self._resident, *self._host) if split_key(k)[0] == adapter_id]:
                found = True
                self.residency.drop(key)
                self.versions.retire(key)
            if (current := self.versions.forget(adapter_id)) is not None:
                self.versions.retire(current)
            return found

    def entries(self) -> list[AdapterEntry]:
        """Every adapter folder under the root with the residency of its newest version."""
        return [
            self.entry(path.name)
            for path in sorted(self.root.iterdir())
            if not path.is_symlink() and (path / CONFIG_FILE).is_file()
        ]

    def entry(self, adapter_id: str) -> AdapterEntry:
        """One adapter's residency (its newest version), without listing the root. An adapter
        on disk only reports the rank and targets its adapter_config.json declares."""
        with self._lock:
            key = self.versions.get(adapter_id) or ""
            found = entry_of(adapter_id, self._resident.get(key), self._host.get(key))
        if found.residency != "disk":
            return found
        rank, targets = declared(self.root / adapter_id)  # read outside the lock
        return dataclasses.replace(found, rank=rank, targets=targets)

    # -- engine side ----------------------------------------------------------------------------
    def want(self, adapter_ids: set[str]) -> None:
        """The ids waiting requests need: the host tier keeps those until they reach the device,
        and the device tier evicts them last. Once per step: it also notes finished copies."""
        with self._lock:
            self.residency.wanted = frozenset(adapter_ids)
            for res in self._resident.values():
                if res.ready is not None and copy_done(res):
                    self.residency.copied(res)

    def claim(self, name: str) -> Resident | AdapterError | None:
        """The newest version (or the exact `id@version`), resident and marked as used by one
        more request; the error that stopped its load; or None while it is on its way (its load
        is moved along). A version whose copy to the device is still in flight is claimed too:
        the compute stream waits for the copy, so its request runs in this step rather than the
        next. With followers, it blocks while they read a version new to them."""
        with self._lock:
            state = self._poll(name, in_flight=True)
            if not isinstance(state, Resident):
                return state
            order_after_copy(state)
            state.fresh = False
            state.refs += 1
            state.last_used = time.time()
            if self._replicas is None or state.key in self._replicas.held:
                return state
        err = self._replicate(state.key)
        if err is None:
            return state
        self.release(state.key)
        changed = err.kind is AdapterErrorKind.CHANGED
        with self._lock:  # None: this rank reads the new files, the request waits for them
            return None if changed and self._replicas.retry(split_key(name)[0]) else err

    def poll(self, name: str) -> Resident | AdapterError | None:
        """Like `claim` without marking it used; `name` is an id (its newest version) or an exact
        `id@version` (what tensor-parallel followers replay)."""
        with self._lock:
            return self._poll(name)

    def wait_resident(
        self, name: str, deadline: float, claim: bool = False
    ) -> Resident | AdapterError | None:
        """Polls `name` (with `claim`: claims it) until it is resident or its load failed; None
        once `deadline` (a `time.monotonic()`) has passed or the cache is closed. Blocking: not
        for the engine thread. A poll, not a wait on a condition: nothing signals the end of a
        copy to the device (its CUDA event is only queried) or a release that frees room."""
        poll = self.claim if claim else self.poll
        while not self._closed:
            if (state := poll(name)) is not None:
                return state
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)
        return None

    def release(self, key: str) -> None:
        """One request stopped using version `key`; an outdated version leaves at its last."""
        with self._lock:
            res = self._resident.get(key)
            if res is None:
                return
            res.refs -= 1
            if res.refs == 0 and not self.versions.is_current(key):
                self.residency.drop(key)

    def weights(self, name: str) -> AdapterWeights:
        """The device weights of a resident version (`id@version`, or an id: its newest)."""
        with self._lock:
            key = name if "@" in name else self.versions.current[name]
            return self._resident[key].weights

    def resident_ids(self) -> list[str]:
        with self._lock:
            return list(dict.fromkeys(split_key(k)[0] for k in self._resident))

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _replicate(self, key: str) -> AdapterError | None:
        """The second phase of residency of a version resident here (see `Replicas`)."""
        assert self._replicas is not None
        err = self._replicas.confirm(key, self._lock, self._resident)
        adapter_id = split_key(key)[0]
        if err is not None and err.kind is AdapterErrorKind.CHANGED:
            with self._lock:
                if self.versions.is_current(key):
                    log.info("adapter files changed while followers read them", key=key)
                    self._forget(adapter_id)  # the next claim reads the files again
        return err

    # -- internals (lock held) ------------------------------------------------------------------
    def _poll(self, name: str, in_flight: bool = False) -> Resident | AdapterError | None:
        """The state of `name`, moving its load along; `in_flight`: a resident version whose
        copy has not finished counts as resident (the caller orders its use after the copy)."""
        adapter_id, version = split_key(name)
        fut = self._loading.get(adapter_id)
        if fut is not None and fut.done():
            del self._loading[adapter_id]
            err = fut.exception()
            if err is not None:
                return as_adapter_error(adapter_id, err)
        elif fut is not None and version is None:
            self.waits["reading"] += 1
            return None  # a read is on its way: it may bring a newer version
        key = name if version else self.versions.get(adapter_id)
        if key is None:
            self._start_load(adapter_id)
            return None
        res = self._resident.get(key)
        if res is not None:
            if res.ready is not None:
                if copy_done(res):
                    self.residency.copied(res)
                elif not in_flight:
                    self.waits["copying"] += 1
                    return None
            self._resident.move_to_end(key)
            return res
        host = self._host.get(key)
        if host is None:
            if fut is not None:
                return None
            if version is not None and self.versions.gone(adapter_id, key):
                return AdapterError(
                    AdapterErrorKind.CHANGED,
                    f"adapter {adapter_id!r} changed on disk: version {version} is not there "
                    "any more; retry to get the new version",
                )
            self._start_load(adapter_id)
            return None
        if not self.residency.make_room(host.flat.numel()):
            self.waits["no_room"] += 1
            return None  # every resident adapter is in use: wait for a request to end
        host.last_used = time.time()
        self._host.move_to_end(key)
        self._resident[key] = self._to_device(key, host)
        self.residency.gauges()
        return self._poll(name, in_flight)

    def _start_load(self, adapter_id: str, force: bool = False) -> Future[str]:
        fut = self._loading.get(adapter_id)
        if fut is None or force:
            fut = self._pool.submit(self._read, adapter_id)
            self._loading[adapter_id] = fut
        return fut

    def _read(self, adapter_id: str) -> str:
        """Loader thread: disk -> host tier (see `HostTier.admit`)."""
        start = time.perf_counter()
        try:
            w, sig = load_adapter(
                self.root,
                adapter_id,
                self.cfg,
                self.group,
                self.dtype,
                self.max_rank,
                self.base_mismatch,
            )
            host = self.host_tier.admit(w, self.device_tier.budget_bytes, lambda: self._closed)
        except BaseException:
            with self._lock:
                self._forget(adapter_id)  # fail closed: no request gets an older version
            raise
        if host is None:
            host = self.host_tier.pack(w)
        with self._lock:
            self._host[w.key] = host
            self._host.move_to_end(w.key)
            if (old := self.versions.adopt(adapter_id, w.key, sig)) is not None:
                log.info("adapter reloaded", adapter_id=adapter_id, old=old, new=w.key)
                self.residency.drop(old)
                self.versions.retire(old)
            self.residency.gauges()
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.adapter_load_seconds.labels("disk_to_host").observe(seconds)
            self.metrics.adapter_load_time.labels(adapter_id).observe(seconds)
        nbytes = host.flat.numel()
        log.info("adapter read", key=w.key, rank=w.rank, bytes=nbytes, seconds=round(seconds, 4))
        return w.key

    def _forget(self, adapter_id: str) -> None:
        """The newest version is no longer current: requests that come next read the files."""
        if (old := self.versions.forget(adapter_id)) is not None:
            self.residency.drop(old)
            self.versions.retire(old)
