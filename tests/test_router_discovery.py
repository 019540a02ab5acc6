"""Discovery through real DNS: shards join and leave while requests run, none fails."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.fleet import Fake, Router, assert_exact, generate, wait_until


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
