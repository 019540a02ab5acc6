"""The router's command line and environment defaults."""

from __future__ import annotations

import pytest

from router.config import ConfigError, Endpoint, Policy, parse_config


def test_config_from_flags_and_environment():
    config = parse_config(
        ["--shard", "h1:1", "--shard", "[::1]:2", "--queue-size", "3"], {"LORAFLEET_PORT": "7000"}
    )
    assert config.shards == (Endpoint("h1", 1), Endpoint("::1", 2))
    assert str(config.shards[1]) == "[::1]:2"
    assert (config.port, config.queue_size, config.policy) == (7000, 3, Policy.CONSOLIDATE)
    from_env = parse_config(
        [], {"LORAFLEET_SHARDS": "a:1, b:2", "LORAFLEET_POLICY": "least-loaded"}
    )
    assert from_env.shards == (Endpoint("a", 1), Endpoint("b", 2))
    assert from_env.policy is Policy.LEAST_LOADED
    # A flag wins over the environment as a pair: --shard-dns replaces LORAFLEET_SHARDS.
    dns = parse_config(["--shard-dns", "svc:50061"], {"LORAFLEET_SHARDS": "a:1"})
    assert (dns.shards, dns.shard_dns) == ((), Endpoint("svc", 50061))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "either --shard"),
        (["--shard", "a:1", "--shard-dns", "b:2"], "either --shard"),
        (["--shard", "a"], "expected HOST:PORT"),
        (["--shard", "a:70000"], "outside 1..65535"),
        (["--shard", "a:1", "--shard", "a:1"], "twice"),
        (["--shard", "a:1", "--queue-size", "-1"], "--queue-size"),
        (["--shard", "a:1", "--port", "x"], "expected an integer"),
        (["--shard", "a:1", "--dns-server", "127.0.0.1:53"], "--dns-server"),
    ],
)
def test_config_rejects_bad_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, {})
