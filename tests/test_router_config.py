"""The router's command line and environment defaults."""

from __future__ import annotations

import pytest

from router.config import (
    ConfigError,
    Endpoint,
    Policy,
    parse_config,
    server_options,
    shard_channel_options,
)


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
        (["--shard", "a:1", "--dns-server", "127.0.0.1:53"], "--dns-server"),
    ],
)
def test_config_rejects_bad_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--queue-size", "-1"], "argument --queue-size: must be >= 0"),
        (["--port", "x"], "argument --port: expected an integer"),
        (["--max-connection-age-s", "-1"], "argument --max-connection-age-s: must be >= 0"),
        (["--max-connection-age-grace-s", "0"], "--max-connection-age-grace-s: must be > 0"),
        (["--shard-keepalive-s", "0"], "argument --shard-keepalive-s: must be > 0"),
        (["--shard-keepalive-timeout-s", "x"], "expected a number"),
    ],
)
def test_malformed_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(["--shard", "a:1", *argv], {})
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_connection_age_and_shard_keepalive_options():
    default = parse_config(["--shard", "a:1"], {})
    assert dict(server_options(default)) == {
        "grpc.so_reuseport": 0,
        "grpc.server.max_pending_requests": 10_000,
        "grpc.server.max_pending_requests_hard_limit": 20_000,
        "grpc.max_connection_age_ms": 300_000,
        "grpc.max_connection_age_grace_ms": 600_000,
    }
    channel = dict(shard_channel_options(default))
    assert channel["grpc.keepalive_time_ms"] == 10_000
    assert channel["grpc.keepalive_timeout_ms"] == channel["grpc.http2.ping_timeout_ms"] == 5_000
    assert channel["grpc.http2.max_pings_without_data"] == 0
    tuned = parse_config(
        ["--shard", "a:1", "--max-connection-age-grace-s", "2.5", "--shard-keepalive-s", "1"],
        {"LORAFLEET_MAX_CONNECTION_AGE_S": "60", "LORAFLEET_SHARD_KEEPALIVE_TIMEOUT_S": "0.5"},
    )
    assert dict(server_options(tuned))["grpc.max_connection_age_ms"] == 60_000
    assert dict(server_options(tuned))["grpc.max_connection_age_grace_ms"] == 2_500
    assert dict(shard_channel_options(tuned))["grpc.keepalive_time_ms"] == 1_000
    assert dict(shard_channel_options(tuned))["grpc.keepalive_timeout_ms"] == 500
    never = parse_config(["--shard", "a:1", "--max-connection-age-s", "0"], {})
    assert "grpc.max_connection_age_ms" not in dict(server_options(never))
