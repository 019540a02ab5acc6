"""Shared fixtures: one tiny model + adapters per test session, written by shard.tiny."""

from __future__ import annotations

from pathlib import Path

import pytest

# Process fixtures (launch, fleet) shared by the router and cluster tests.
pytest_plugins = ("tests.fleet",)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from shard.tiny import write_tiny

    return write_tiny(Path(tmp_path_factory.mktemp("tiny")))
