"""The router's admission over a simulated fleet: the shard table that
`router.admission.Admission` places on, with every shard eligible and its load exact.

The simulation publishes each shard's load here as it changes (`publish`); a change that can
free room (a request finished, a request left for another shard) notifies admission, which
serves its queue in order, as the router's shard table does on a snapshot. A placement's own
join updates the index without a notification, as the router's reservations do.
"""

from __future__ import annotations

from collections.abc import Callable

from router.policy import Demand, ShardLoad
from router.shard_index import ShardIndex
from router.shards import Reservation


class SimHandle:
    """One simulated shard as admission sees it: always eligible; the simulation itself joins
    a placed request to its shard, so reservations have nothing to count."""

    __slots__ = ("address", "indexed", "shard")

    def __init__(self, address: str, shard: object):
        self.address = address
        self.shard = shard
        self.indexed = True

    def eligible(self) -> bool:
        return True

    def reserve(self, demand: Demand) -> Reservation:
        return Reservation(self)  # type: ignore[arg-type]

    def answered(self, reservation: Reservation) -> None:
        pass

    def release(self, reservation: Reservation) -> None:
        pass


class SimTable:
    """Every simulated shard by name; what `Admission` needs of a shard table."""

    def __init__(self) -> None:
        self._handles: dict[str, SimHandle] = {}
        self._serving: list[SimHandle] = []
        self._index: ShardIndex | None = None
        self._listeners: list[Callable[[], None]] = []

    def add(self, address: str, shard: object) -> None:
        handle = SimHandle(address, shard)
        self._handles[address] = handle
        self._serving.append(handle)

    def track(self, index: ShardIndex) -> None:
        self._index = index

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def sync(self) -> None:
        """Nothing to do: `publish` updates the index at once."""

    def get(self, address: str) -> SimHandle | None:
        return self._handles.get(address)

    def serving(self) -> list[SimHandle]:
        return self._serving

    def addresses(self) -> list[str]:
        return sorted(self._handles)

    def publish(self, load: ShardLoad, notify: bool) -> None:
        """A shard's new load; with `notify`, admission serves its queue at once."""
        assert self._index is not None, "admission tracks the table from its construction"
        self._index.update(load.shard, load)
        if notify:
            for listener in self._listeners:
                listener()
