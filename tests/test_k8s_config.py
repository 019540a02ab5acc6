"""k8s/ ConfigMaps against the CLIs: every LORAFLEET_* key a container gets is a variable its
CLI documents, and the real CLI parses the container's args and env into the matching setting."""

from __future__ import annotations

import enum
from pathlib import Path

import pytest

from tests.k8s_manifests import KUSTOMIZATIONS, container_of, env_of, manifests

# LORAFLEET_* variables each CLI reads as flag defaults (DESIGN.md, "Command line").
ROUTER_ENV = {
    "LORAFLEET_PORT",
    "LORAFLEET_HTTP_PORT",
    "LORAFLEET_METRICS_PORT",
    "LORAFLEET_SHARD_DNS",
    "LORAFLEET_POLICY",
    "LORAFLEET_LOG_FORMAT",
    "LORAFLEET_SHUTDOWN_GRACE_S",
}
SHARD_ENV = {
    "LORAFLEET_MODEL",
    "LORAFLEET_ADAPTERS",
    "LORAFLEET_PORT",
    "LORAFLEET_DEVICE",
    "LORAFLEET_DTYPE",
    "LORAFLEET_TP",
    "LORAFLEET_MAX_BATCH_SIZE",
    "LORAFLEET_KV_MEMORY_FRACTION",
    "LORAFLEET_METRICS_PORT",
    "LORAFLEET_LOG_FORMAT",
    "LORAFLEET_DRAIN_TIMEOUT_S",
}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize(("component", "known"), [("router", ROUTER_ENV), ("shard", SHARD_ENV)])
def test_configmap_keys_are_cli_env_vars(
    built: dict[str, Path], name: str, component: str, known: set[str]
) -> None:
    docs = manifests(built, name)
    env = env_of(docs, container_of(docs, component))
    lorafleet = {k for k in env if k.startswith("LORAFLEET_")}
    assert lorafleet <= known, f"{component}: unknown {sorted(lorafleet - known)}"
    assert lorafleet, f"{component}: no LORAFLEET_* configuration"


def _plain(value: object) -> object:
    """A config field as the text-ish value an env var would hold (enums, paths, endpoints)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (int, float)) or value is None:
        return value
    return str(value)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("component", ["router", "shard"])
def test_the_cli_reads_every_configmap_key(
    built: dict[str, Path], tiny, tmp_path: Path, name: str, component: str
) -> None:
    """Parses the container's args and env with the real CLI: each LORAFLEET_X lands in field x."""
    cli = pytest.importorskip(f"{component}.config", reason=f"the {component} CLI is not written")
    docs = manifests(built, name)
    c = container_of(docs, component)
    env = {k: v for k, v in env_of(docs, c).items() if k.startswith("LORAFLEET_")}
    # Folders the shard checks for; the pod mounts them, here they are links to the tiny ones.
    for var, target in (
        ("LORAFLEET_MODEL", tiny.model_dir),
        ("LORAFLEET_ADAPTERS", tiny.adapters_dir),
    ):
        if var in env:
            env[var] = str(tmp_path / var)
            Path(env[var]).symlink_to(target)
    config = cli.parse_config(c.get("args", []), env=env)
    for var, text in env.items():
        field = var.removeprefix("LORAFLEET_").lower()
        assert hasattr(config, field), f"{component} CLI has no setting for {var}"
        value = _plain(getattr(config, field))
        expected = type(value)(text) if isinstance(value, (int, float)) else text
        assert value == expected, f"{var}={text!r} gave {component} config {field}={value!r}"
