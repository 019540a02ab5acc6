"""Discovery through real DNS: shards join and leave while requests run, none fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dnslib
import pytest
from dnslib.server import DNSLogger, DNSServer

from tests.fleet import (
    Fake,
    Router,
    assert_exact,
    generate,
    wait_until,
)


class Zone:
    """A DNS resolver answering one name with a changeable list of A records."""

    def __init__(self, name: str):
        self.name = name
        self.addresses: list[str] = []
        self.lock = threading.Lock()

    def resolve(self, request: dnslib.DNSRecord, handler) -> dnslib.DNSRecord:
        reply = request.reply()
        if str(request.q.qname).rstrip(".") != self.name:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply
        with self.lock:
            for address in self.addresses:
                reply.add_answer(dnslib.RR(request.q.qname, rdata=dnslib.A(address), ttl=1))
        return reply


@pytest.fixture
def dns() -> Iterator[tuple[Zone, int]]:
    zone = Zone("shards.lorafleet.test")
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    try:
        yield zone, server.server.server_address[1]
    finally:
        server.stop()


def test_dns_discovery_adds_and_removes_shards_while_requests_run(launch, dns):
    zone, dns_port = dns
    first = launch(Fake, "127.0.0.2", 0, "--max-batch-size=4", "--token-delay-s=0.04")
    second = launch(Fake, "127.0.0.3", first.port, "--max-batch-size=4", "--token-delay-s=0.04")
    zone.addresses = ["127.0.0.2"]
    router = launch(
        Router,
        f"--shard-dns={zone.name}:{first.port}",
        f"--dns-server=127.0.0.1:{dns_port}",
        "--resolve-interval-s=0.2",
    )
    router.wait_shards([first.address])

    with ThreadPoolExecutor(8) as pool:
        early = [
            pool.submit(generate, router.stub, f"early {i}", "a", 100, f"dns-early-{i}")
            for i in range(4)
        ]
        wait_until(
            lambda: all(first.events("start", f"dns-early-{i}") for i in range(4)),
            "the first shard to run four streams",
        )
        with zone.lock:
            zone.addresses = ["127.0.0.2", "127.0.0.3"]
        router.wait_shards([first.address, second.address])
        # The first shard's batch is full (4 streams of 4 s): the new shard takes the next one.
        joined = pool.submit(generate, router.stub, "joined", "b", 10, "dns-joined")
        wait_until(lambda: second.events("start", "dns-joined"), "the new shard to be used")
        with zone.lock:
            zone.addresses = ["127.0.0.3"]
        router.wait_shards([second.address])
        after = generate(router.stub, "after removal", "c", 10, "dns-after")
        for i, future in enumerate(early):
            assert_exact(future.result(timeout=20), "a", f"early {i}", 100)
        assert_exact(joined.result(timeout=20), "b", "joined", 10)
    assert_exact(after, "c", "after removal", 10)
    assert second.events("start", "dns-after")
    # Leaving the table did not cut the first shard's running streams.
    assert not first.events("cancelled")
    assert not first.events("migrated")
