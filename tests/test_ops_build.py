"""The kernel build's target: the normal fat binary, or compute_80 PTX under LORAFLEET_SM80."""

from __future__ import annotations

import pytest

from shard.ops import build


def test_default_build_holds_sm80_and_sm90a_machine_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFLEET_SM80", raising=False)
    name, flags = build.build_target()
    assert name == build.NAME
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert not any("code=compute_" in f for f in flags)


def test_sm80_switch_builds_only_compute80_ptx_under_its_own_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAFLEET_SM80", "1")
    name, flags = build.build_target()
    assert name != build.NAME and name.startswith(build.NAME)
    gencodes = [f for f in flags if f.startswith("-gencode")]
    assert gencodes == ["-gencode=arch=compute_80,code=compute_80"]
    assert "-O3" in flags
