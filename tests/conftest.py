"""Shared fixtures: one tiny model + adapters per test session, written by shard.tiny."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# Process fixtures (launch, fleet) shared by the router and cluster tests; the in-process shard
# over a root of good and broken adapters (root, shard) shared by the adapter tests; the built
# kustomizations (built) shared by the k8s tests.
pytest_plugins = ("tests.fleet", "tests.adapter_shard", "tests.k8s_manifests")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from shard.tiny import write_tiny

    return write_tiny(Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], object]:
    """Returns the tiny model of a `tests.families.FAMILY_SPECS` name, written once a session."""
    from shard.tiny import write_tiny
    from tests.families import FAMILY_SPECS

    written: dict[str, object] = {}

    def get(name: str) -> object:
        if name not in written:
            written[name] = write_tiny(tmp_path_factory.mktemp(name), spec=FAMILY_SPECS[name])
        return written[name]

    return get
