"""Discovery: keeps the shard table in step with a static list or a DNS name.

A DNS name (the headless Service of the shard StatefulSet) resolves to one A record per ready pod;
it is re-resolved periodically, new addresses join the table (eligible once healthy) and vanished
ones leave it (their running calls continue). A failed lookup keeps the table as it is; an answer
without addresses empties it.
"""

from __future__ import annotations

import asyncio
import socket

import dnslib
import structlog

from router.config import Endpoint, RouterConfig
from router.shard_table import ShardTable

log = structlog.get_logger("router.discovery")

_DNS_TIMEOUT_S = 1.0


class LookupFailed(Exception):
    """The resolver gave no usable answer (timeout, server failure): keep what we have."""


async def resolve_system(name: Endpoint) -> set[str]:
    """Addresses of `name` from the system resolver (getaddrinfo), as host:port strings."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            name.host, name.port, type=socket.SOCK_STREAM
        )
    except socket.gaierror as err:
        if err.errno == socket.EAI_NONAME:
            return set()
        raise LookupFailed(f"getaddrinfo({name.host}): {err}") from err
    return {str(Endpoint(str(info[4][0]), name.port)) for info in infos}


async def resolve_direct(name: Endpoint, server: Endpoint) -> set[str]:
    """Addresses of `name` from A records asked of `server` directly (UDP)."""
    question = dnslib.DNSRecord.question(name.host, "A")
    try:
        raw = await asyncio.to_thread(
            question.send, server.host, server.port, timeout=_DNS_TIMEOUT_S
        )
        reply = dnslib.DNSRecord.parse(raw)
    except (OSError, dnslib.DNSError) as err:
        raise LookupFailed(f"DNS query for {name.host} to {server}: {err}") from err
    rcode = reply.header.rcode
    if rcode == dnslib.RCODE.NXDOMAIN:
        return set()
    if rcode != dnslib.RCODE.NOERROR:
        raise LookupFailed(f"DNS query for {name.host} to {server}: {dnslib.RCODE[rcode]}")
    return {
        str(Endpoint(str(rr.rdata), name.port)) for rr in reply.rr if rr.rtype == dnslib.QTYPE.A
    }


class Discovery:
    """Feeds the shard table from the config's static list or DNS name."""

    def __init__(self, config: RouterConfig, table: ShardTable):
        self._config = config
        self._table = table

    async def run(self) -> None:
        """Adds static shards once, or re-resolves the DNS name until cancelled."""
        name = self._config.shard_dns
        if name is None:
            for endpoint in self._config.shards:
                self._table.add(str(endpoint))
            return
        while True:
            await self.refresh(name)
            await asyncio.sleep(self._config.resolve_interval_s)

    async def refresh(self, name: Endpoint) -> None:
        """One resolution of `name`, applied to the table."""
        try:
            if self._config.dns_server is None:
                found = await resolve_system(name)
            else:
                found = await resolve_direct(name, self._config.dns_server)
        except LookupFailed as err:
            log.warning("shard lookup failed; keeping the current shards", error=str(err))
            return
        known = set(self._table.addresses())
        for address in sorted(found - known):
            self._table.add(address)
        for address in sorted(known - found):
            await self._table.remove(address)
