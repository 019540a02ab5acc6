"""Rank 0's end of the step-plan channel to its followers."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import structlog

from shard.adapters.loader import AdapterError
from shard.parallel.group import GroupLost, TPGroup, broadcast_object, gather_object
from shard.parallel.messages import HEARTBEAT, Hold, Message

log = structlog.get_logger(__name__)


class PlanChannel:
    """Rank 0's end of the step-plan channel: one message at a time (a plan, an adapter hold,
    the exit), and a heartbeat whenever nothing was sent for `heartbeat_s`, so that a follower's
    timed wait for the next plan never expires on an idle shard, and a dead follower is noticed
    (its connection closes) within a heartbeat even when no request runs. With a group of one,
    nothing is sent."""

    def __init__(
        self,
        group: TPGroup,
        heartbeat_s: float = 1.0,
        on_lost: Callable[[GroupLost], None] = lambda _: None,
    ) -> None:
        """`on_lost` hears of a lost rank once, from whichever thread sent (the engine's inbox:
        a lost rank ends the shard)."""
        self.group = group
        self.heartbeat_s = heartbeat_s
        self.lost: GroupLost | None = None
        self._on_lost = on_lost
        self._lock = threading.Lock()  # one sender at a time on the metadata group
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tp-heartbeat", daemon=True)

    def start(self) -> None:
        """Starts the heartbeat, once the rank is built: until then the followers wait for the
        messages of building (the agreed KV pool size), which a heartbeat must not come
        between."""
        if self.group.size > 1:
            self._thread.start()

    def replicate(self, key: str, keep: tuple[str, ...]) -> AdapterError | None:
        """Asks every follower to hold adapter version `key` (reading it if needed) and to keep
        holding `keep`; the first follower error, naming its rank, or None when all hold it."""
        replies = self.send(Hold(key, keep), answered=True)
        for rank, err in enumerate(replies):
            if isinstance(err, AdapterError):
                return AdapterError(err.kind, f"{err} (tensor-parallel rank {rank})")
        return None

    def close(self) -> None:
        """Stops the heartbeat and, if the group is whole, tells the followers to exit."""
        self._closed.set()
        with contextlib.suppress(GroupLost):
            self.send(None)

    def send(self, msg: Message, answered: bool = False) -> list[object]:
        """Broadcasts `msg`; with `answered`, every rank's answer (gathered in the same turn
        of the lock, so no heartbeat comes between)."""
        if self.group.size == 1:
            return []
        with self._lock:
            if self.lost is not None:
                raise self.lost
            try:
                broadcast_object(msg, self.group)
                replies = gather_object(None, self.group) if answered else []
            except GroupLost as e:
                self.lost = e
            else:
                self._last_send = time.monotonic()
                return replies
        log.error("tensor-parallel group lost", error=str(self.lost))
        self._on_lost(self.lost)
        raise self.lost

    def _beat(self) -> None:
        while not self._closed.wait(self.heartbeat_s / 4):
            if time.monotonic() - self._last_send < self.heartbeat_s:
                continue
            try:
                self.send(HEARTBEAT)
            except GroupLost:
                return
